"""The training config computes the weight map once per volume (the model-zoo checks: test_model_zoo.py)."""

from monai.bundle import ConfigParser

from conftest import BUNDLE


def test_weight_map_is_cached_before_any_random_transform():
    """W is computed once per volume (inside the CacheDataset's deterministic part), never per training step."""
    from monai.transforms import Randomizable

    from scripts.weights import WeightMapd

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE)
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    assert any(isinstance(t, WeightMapd) for t in transforms)
    assert not any(isinstance(t, Randomizable) for t in transforms), "a random transform would stop the caching"
    assert parser["train#dataset#_target_"] == "CacheDataset" and parser["train#dataset#cache_rate"] == 1.0
