"""Sans-IO translations between provider wire formats, named source_target."""
