"""What compile writes and serve reads: the manifest, the graph set of a recipe, the compile cache."""
