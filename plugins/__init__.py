"""Built-in Sluice plugins; each module holds one plugin."""
