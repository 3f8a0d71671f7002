"""Python package of the EM dense segmentation bundle (imported by configs as ``scripts.*``)."""
