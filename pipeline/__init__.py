"""pipeline: mask and depth from a background and a composite; zips -> shards -> a trained UNet."""

__version__ = "0.1.0"
DISTRIBUTION = "maskdepth-pipeline"  # the name on PyPI ("pipeline" is another project's)
