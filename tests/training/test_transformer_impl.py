"""``--transformer-impl``: Megatron scripts pass it; only ``local`` is what mindlora builds."""
import pytest

from mindlora.training.args import parse_args

BASE = ["--load", "/nonexistent/base", "--data-path", "/nonexistent/data"]


def test_transformer_engine_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"--transformer-impl transformer_engine is not "
                                         r"supported: .* does not use Transformer Engine"):
        parse_args(BASE + ["--transformer-impl", "transformer_engine"])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("transformer-impl: transformer_engine\n")
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine is not"):
        parse_args(BASE + ["--config", str(cfg)])
    assert parse_args(BASE + ["--transformer-impl", "local"]).train.load == "/nonexistent/base"
    parse_args(BASE)  # absent: the local layers
