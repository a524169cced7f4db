"""Any model: the transformer blocks are found by structure for every decoder-only family, the
captured residual equals ``hidden_states[layer + 1]`` exactly, and an unsupported model fails in
one line before anything is written. Tiny random models, built offline (tests/tiny_models.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsae.activations import (  # noqa: E402
    HarvestConfig,
    HarvestError,
    LanguageModel,
    ModelLoadError,
    capture_residual,
    check_capture,
    harvest,
    load_language_model,
    stream_activations,
)
from hsae.activations.models import decoder_layers  # noqa: E402
from tiny_models import FAMILIES, LAYERS, save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

# The end-to-end harvest runs by default for the families that failed before the generic search
# (OPT, the multimodal Gemma 3) and two common ones; the rest of the matrix is marked slow.
FAST_HARVEST = {"opt", "gemma3_multimodal", "gpt2", "llama"}


def _lm(model) -> LanguageModel:
    text = model.config.get_text_config()
    return LanguageModel(
        model=model,
        tokenizer=tiny_tokenizer(),
        name=type(model).__name__,
        d_model=int(text.hidden_size),
        n_layers=int(text.num_hidden_layers),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_equals_hidden_states_for_every_family(family):
    model = tiny_model(family)
    lm = _lm(model)
    blocks = decoder_layers(model)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == LAYERS == lm.n_layers
    names = [name for name, module in model.named_modules() if module is blocks]
    assert not any("vision" in name for name in names)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == LAYERS + 1
    for layer in range(LAYERS - 1):  # the last hidden state has the final norm applied
        ran: list[int] = []
        hooks = [
            block.register_forward_hook(lambda *_, i=i, ran=ran: ran.append(i))
            for i, block in enumerate(blocks)
        ]
        try:
            captured = capture_residual(lm, ids, mask, layer)
        finally:
            for hook in hooks:
                hook.remove()
        assert ran == list(range(layer + 1)), "blocks after `layer` must not run"
        assert captured.shape == (2, 9, lm.d_model)
        assert torch.equal(captured, hidden[layer + 1]), f"{family} layer {layer}"


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    docs = [f"the cat {i} sat on the mat; a dog ran in the park at dawn." for i in range(40)]
    path.write_text("\n\n".join(docs))
    return str(path)


@pytest.mark.parametrize(
    "family",
    [f if f in FAST_HARVEST else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)],
)
def test_harvest_from_a_local_folder_of_every_family(family, tmp_path):
    folder = save_tiny(family, tmp_path / "model")
    config = HarvestConfig(
        model=str(folder),
        layer=1,
        dataset=_corpus(tmp_path),
        tokens=200,
        context_length=16,
        batch_size=4,
        shard_tokens=64,
        heldout_fraction=0.2,
        device="cpu",
    )
    cache = harvest(config, tmp_path / "acts", progress=False)
    assert cache.complete and cache.manifest["layer"] == 1
    assert cache.manifest["model"]["n_layers"] == LAYERS
    lm = load_language_model(str(folder), device="cpu", dtype=torch.float32)
    info = cache.token_info("train")
    acts = cache.all_activations("train")
    first = info.context_ids == info.context_ids[0]
    order = info.positions[first].argsort()
    ids = torch.as_tensor(
        np.concatenate([[lm.bos_token_id], info.token_ids[first][order]]), dtype=torch.long
    )[None]
    with torch.inference_mode():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    expected = hidden[torch.as_tensor(info.positions[first][order])]
    torch.testing.assert_close(acts[first][order], expected, rtol=1e-5, atol=1e-5)


def test_streaming_works_for_a_multimodal_class(tmp_path):
    lm = _lm(tiny_model("gemma3_multimodal"))
    stream = stream_activations(
        lm=lm, layer=0, dataset=_corpus(tmp_path), batch_size=16, context_length=16,
        model_batch_size=2, shuffle_buffer=0, loop=False,
    )  # fmt: skip
    assert next(stream).shape == (16, lm.d_model)


def _unsupported() -> LanguageModel:
    """A model whose blocks sit in no ModuleList: the forward runs, but nothing can be hooked."""
    model = tiny_model("llama")
    model.model.layers = torch.nn.Sequential(*model.model.layers)
    return _lm(model)


def test_unsupported_model_fails_in_one_line_before_anything_is_written(tmp_path):
    lm = _unsupported()
    out = tmp_path / "acts"
    config = HarvestConfig(layer=1, dataset=_corpus(tmp_path), tokens=64, context_length=16)
    with pytest.raises(ModelLoadError, match="cannot find the transformer blocks") as info:
        harvest(config, out, lm=lm, progress=False)
    assert "\n" not in str(info.value) and "LlamaForCausalLM" in str(info.value)
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="not supported"):
        stream_activations(lm=lm, layer=1, dataset=_corpus(tmp_path), batch_size=8)


def test_a_block_that_is_never_reached_fails_before_anything_is_written(tmp_path):
    model = tiny_model("llama")
    base = model.model
    base.forward = lambda input_ids=None, **_: base.embed_tokens(input_ids)  # skips the blocks
    lm = _lm(model)
    out = tmp_path / "acts"
    config = HarvestConfig(layer=1, dataset=_corpus(tmp_path), tokens=64, context_length=16)
    with pytest.raises(HarvestError, match="block 1 of LlamaForCausalLM was never reached") as info:
        harvest(config, out, lm=lm, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_a_model_whose_blocks_are_not_batch_first_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, XLNetConfig

    config = XLNetConfig(vocab_size=320, d_model=32, n_layer=3, n_head=4, d_inner=64)
    lm = _lm(AutoModelForCausalLM.from_config(config).eval())  # blocks work in [seq, batch, d]
    out = tmp_path / "acts"
    config = HarvestConfig(layer=1, dataset=_corpus(tmp_path), tokens=64, context_length=16)
    with pytest.raises(ModelLoadError, match=r"shape \(3, 1, 32\), expected \(1, 3, 32\)"):
        harvest(config, out, lm=lm, progress=False)
    assert not out.exists()


def test_a_block_output_that_is_no_hidden_state_is_refused(tmp_path):
    model = tiny_model("llama")
    base = model.model
    forward = base.forward

    def shifted(*args, **kwargs):  # a model whose hidden_states are not its blocks' outputs
        out = forward(*args, **kwargs)
        if out.hidden_states is not None:
            out.hidden_states = tuple(h + 1.0 for h in out.hidden_states)
        return out

    base.forward = shifted
    out = tmp_path / "acts"
    config = HarvestConfig(layer=1, dataset=_corpus(tmp_path), tokens=64, context_length=16)
    with pytest.raises(ModelLoadError, match="none of the model's hidden states"):
        harvest(config, out, lm=_lm(model), progress=False)
    assert not out.exists()
    last = HarvestConfig(layer=LAYERS - 1, dataset=_corpus(tmp_path), tokens=64, context_length=16)
    assert harvest(last, out, lm=_lm(model), progress=False).complete  # last block: not compared


def test_a_bfloat16_model_passes_the_probe():
    model = tiny_model("gemma3_multimodal").to(torch.bfloat16)
    lm = _lm(model)
    lm.dtype = torch.bfloat16
    check_capture(lm, 1)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    captured = capture_residual(lm, ids, torch.ones_like(ids), 1)
    assert captured.dtype == torch.bfloat16 and torch.equal(captured, hidden[2])


def test_cli_refuses_an_unsupported_model_folder_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM, XLNetConfig
    from typer.testing import CliRunner

    from hsae.cli import app

    config = XLNetConfig(vocab_size=320, d_model=32, n_layer=3, n_head=4, d_inner=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "xlnet")
    tiny_tokenizer().save_pretrained(tmp_path / "xlnet")
    out = tmp_path / "acts"
    args = ["harvest", "--model", str(tmp_path / "xlnet"), "--dataset", _corpus(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0])  # (after a load bar)
    assert "XLNetLMHeadModel" in errors[0] and "not supported" in errors[0]
    assert not out.exists()
