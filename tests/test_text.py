"""lvit.text: official report preprocessing, the three backends, and the on-disk embedding cache."""

from __future__ import annotations

import pytest
import torch

from lvit.core.errors import ConfigError
from lvit.text import (
    HFEncoder,
    LearnedEncoder,
    MiniLMEncoder,
    cache_file,
    encode_cached,
    get_text_encoder,
    minilm_path,
    prepare_report,
    swap_left_right,
)

REPORTS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "No pulmonary infection.",
]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    enc = get_text_encoder("minilm")
    enc.encode(REPORTS[:1])  # load once for the module
    return enc


def test_prepare_report_pads_like_the_official_loader():
    assert prepare_report("No pulmonary infection.") == "No pulmonary infection." + " EOF XXX" * 6
    long = "one two three four five six seven eight nine"
    assert prepare_report(long) == long
    assert prepare_report("  a   b ") == "a b" + " EOF XXX" * 7


def test_swap_left_right_keeps_case():
    assert swap_left_right("Upper left lung and lower Right lung.") == "Upper right lung and lower Left lung."
    assert swap_left_right("LEFT leftover") == "RIGHT leftover"


def test_minilm_shape_mask_and_determinism(minilm):
    emb, mask = minilm.encode(REPORTS)
    assert emb.shape == (3, 10, 384) and emb.dtype == torch.float32
    assert mask.shape == (3, 10) and mask.dtype == torch.bool and mask.all()  # padded to >= 9 words
    again, _ = minilm.encode(REPORTS)
    assert torch.equal(emb, again)
    alone, _ = minilm.encode(REPORTS[1:2])  # batching (padding to the longest) must not change the result
    torch.testing.assert_close(alone[0], emb[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(emb[0], emb[1])


def test_max_tokens_and_explicit_padding(minilm):
    enc = MiniLMEncoder(max_tokens=32, min_words=0)
    enc._tokenizer, enc._model = minilm._tokenizer, minilm._model  # reuse the loaded weights
    emb, mask = enc.encode(["left lung.", REPORTS[0]])
    assert emb.shape == (2, 32, 384)
    assert mask[0].tolist() == [True] * 3 + [False] * 29  # "left", "lung", "."
    assert torch.all(emb[0, 3:] == 0)
    assert mask[1].sum() < 32  # long report: all word pieces kept, rest padding


def test_hf_folder_backend_matches_minilm(minilm):
    enc = get_text_encoder(f"hf:{minilm_path()}", max_tokens=10)
    assert isinstance(enc, HFEncoder) and enc.dim == 384 and not enc.loaded
    assert enc.name != minilm.name and enc.spec.startswith("hf:")
    emb, mask = enc.encode(REPORTS[:2])
    assert emb.shape == (2, 10, 384) and mask.shape == (2, 10)
    torch.testing.assert_close(emb, minilm.encode(REPORTS[:2])[0])


def test_hf_folder_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        get_text_encoder(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="unknown text encoder"):
        get_text_encoder("word2vec")


def test_cache_hit_does_not_load_model_and_change_reencodes_only_that_text(minilm, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, first_mask = encode_cached(minilm, REPORTS, cache)
    assert cache_file(minilm, cache).is_file()

    fresh = MiniLMEncoder()  # a new process would start like this: nothing loaded
    second, second_mask = encode_cached(fresh, REPORTS, cache)
    assert not fresh.loaded and fresh.n_model_calls == 0
    assert torch.equal(first, second) and torch.equal(first_mask, second_mask)

    seen: list[str] = []
    original = type(minilm)._encode_prepared

    def spy(self, texts):
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(type(minilm), "_encode_prepared", spy)
    changed = REPORTS[:2] + ["Unilateral pulmonary infection, one infected area, lower left lung."]
    emb, _ = encode_cached(minilm, changed, cache)
    assert seen == [prepare_report(changed[2])]  # only the changed report reaches the model
    assert torch.equal(emb[:2], first[:2]) and not torch.equal(emb[2], first[2])


def test_cache_key_depends_on_max_tokens(minilm, tmp_path):
    other = MiniLMEncoder(max_tokens=12)
    assert cache_file(other, tmp_path) != cache_file(minilm, tmp_path)


def test_damaged_cache_is_rebuilt(minilm, tmp_path):
    path = cache_file(minilm, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable text cache"):
        emb, _ = encode_cached(minilm, REPORTS[:1], tmp_path)
    assert emb.shape == (1, 10, 384)
    assert torch.equal(encode_cached(minilm, REPORTS[:1], tmp_path)[0], emb)


def test_learned_backend_tokenize_module_and_roundtrip(tmp_path):
    enc = get_text_encoder("learned", max_tokens=10, texts=REPORTS, dim=16)
    assert isinstance(enc, LearnedEncoder) and enc.trainable
    ids, mask = enc.tokenize(["upper left lung, unknownword"])
    assert ids.shape == (1, 10) and ids.dtype == torch.long and mask.all()  # EOF XXX padding fills L
    assert ids[0, 4].item() == 1  # <unk>
    module = enc.build_module()
    out = module(ids)  # [N, L, D]
    assert out.shape == (1, 10, 16)
    out.sum().backward()
    assert module.embedding.weight.grad is not None
    emb, emask = enc.encode(REPORTS)
    assert emb.shape == (3, 10, 16) and emask.shape == (3, 10)
    assert torch.equal(encode_cached(enc, REPORTS, tmp_path)[0], emb)  # trainable: not cached, same result
    assert not any(tmp_path.iterdir())
    enc.save(tmp_path / "vocab.json")
    back = get_text_encoder(f"learned:{tmp_path / 'vocab.json'}")
    assert back.vocab == enc.vocab and torch.equal(back.tokenize(REPORTS)[0], enc.tokenize(REPORTS)[0])
    with pytest.raises(ConfigError, match="training reports"):
        get_text_encoder("learned")


def test_cache_bytes_are_the_same_from_one_write_to_the_next_and_old_files_still_read(minilm, tmp_path):
    import json

    from safetensors.torch import save_file

    from lvit.text.cache import cache_file_bytes, read_cache_rows

    first = cache_file_bytes(minilm, REPORTS)
    assert all(cache_file_bytes(minilm, REPORTS) == first for _ in range(3))
    path = tmp_path / "new.safetensors"
    path.write_bytes(first)
    rows = read_cache_rows(path, minilm)
    assert len(rows) == len(REPORTS)
    # A file written before the one-key format (the first shipped folders' report caches) keeps its rows.
    hashes = sorted(rows)
    old = tmp_path / "old.safetensors"
    save_file({"emb": torch.stack([rows[h][0] for h in hashes]), "mask": torch.stack([rows[h][1] for h in hashes])},
              str(old), metadata={"encoder": minilm.name, "max_tokens": str(minilm.max_tokens),
                                  "dim": str(minilm.dim), "hashes": json.dumps(hashes)})
    old_rows = read_cache_rows(old, minilm)
    assert sorted(old_rows) == hashes and all(torch.equal(old_rows[h][0], rows[h][0]) for h in hashes)


def test_a_half_precision_cache_is_half_the_bytes_and_reads_back_as_float32(minilm, tmp_path):
    """A float16 model folder ships its report embeddings in float16 too (the width-32 model's folder would not
    fit 16 MiB otherwise); whoever reads them gets float32, the float16 rounding of the float32 rows."""
    from safetensors import safe_open

    from lvit.text.cache import cache_file_bytes, read_cache_rows

    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    full.write_bytes(cache_file_bytes(minilm, REPORTS))
    half.write_bytes(cache_file_bytes(minilm, REPORTS, half=True))
    with safe_open(str(half), framework="pt") as fh:
        assert fh.get_tensor("emb").dtype == torch.float16
    assert half.stat().st_size < 0.6 * full.stat().st_size
    rows, half_rows = read_cache_rows(full, minilm), read_cache_rows(half, minilm)
    assert sorted(rows) == sorted(half_rows)
    for key, (emb, mask) in rows.items():
        assert half_rows[key][0].dtype == torch.float32 and torch.equal(half_rows[key][1], mask)
        assert torch.equal(half_rows[key][0], emb.half().float())
    # rows added to a float16 file keep it float16 (and its rows as they are) unless told otherwise
    grown = tmp_path / "grown.safetensors"
    extra = "left pulmonary infection, one infected area, upper left lung."
    grown.write_bytes(cache_file_bytes(minilm, [*REPORTS, extra], base=half))
    with safe_open(str(grown), framework="pt") as fh:
        assert fh.get_tensor("emb").dtype == torch.float16
    grown_rows = read_cache_rows(grown, minilm)
    assert len(grown_rows) == len(rows) + 1 and all(torch.equal(grown_rows[k][0], half_rows[k][0]) for k in rows)
