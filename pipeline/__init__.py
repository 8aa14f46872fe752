"""pipeline: mask and depth from a background and a composite, from zips to shards to a trained UNet."""

__version__ = "0.1.0"
