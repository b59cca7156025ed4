"""bench/nearest_report.py: a reworded report replaced by its nearest training report, and the facts that keeps."""

from __future__ import annotations

import torch
from files import load_bench

LEFT = "Unilateral pulmonary infection, one infected area, lower left lung."
RIGHT = "Unilateral pulmonary infection, one infected area, lower right lung."
BOTH = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


def test_nearest_is_the_most_similar_key_for_each_query():
    near = load_bench("bench/nearest_report.py", "bench_nearest_report")
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    queries = torch.nn.functional.normalize(torch.tensor([[0.1, 0.9], [0.6, 0.5]]), dim=-1)
    assert near.nearest(queries, keys).tolist() == [1, 2]  # one index per query, into the keys


def test_agreement_counts_each_fact_apart():
    near = load_bench("bench/nearest_report.py", "bench_nearest_report")
    templates = [LEFT, RIGHT, BOTH]
    # read as itself; as the other side (sides and count right, zones wrong); as the bilateral report (all wrong)
    pairs = [("a", LEFT), ("b", LEFT), ("c", LEFT)]
    out = near.agreement(pairs, templates, {"a": 0, "b": 1, "c": 2})
    assert out["images"] == 3
    assert out["all_kept"] == 1 / 3 and out["zones_kept"] == 1 / 3
    assert out["sides_kept"] == 2 / 3 and out["count_kept"] == 2 / 3


def test_sentence_vectors_are_unit_means_of_the_word_pieces():
    near = load_bench("bench/nearest_report.py", "bench_nearest_report")

    class Encoder:  # two reports: two word pieces, then one (the rest padding)
        def encode(self, texts):
            vectors = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [9.0, 9.0]], [[0.0, 2.0], [5.0, 5.0], [5.0, 5.0]]])
            mask = torch.tensor([[True, True, False], [True, False, False]])
            return vectors, mask

    out = near.sentence_vectors(Encoder(), ["x", "y"])
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # padding ignored, then unit length


def test_section_is_rendered_from_the_raw_entry(tmp_path):
    near = load_bench("bench/nearest_report.py", "bench_nearest_report")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    row = {"images": 4, "all_kept": 0.5, "sides_kept": 1.0, "count_kept": 0.75, "zones_kept": 0.5}
    entry = {"split": "test", "seed": 0, "training_reports": 3, "rules": {"original": row, "digits": row},
             "command": "python bench/nearest_report.py --data QATA", "seconds": 12.0, "machine": "CPU x"}
    body = near.render(entry, md)
    assert "| digits | 4 | 0.500 | 1.000 | 0.750 | 0.500 |" in body
    assert "| none (the original reports) | 4 |" in body
    assert "<!-- nearest-report:start -->" in md.read_text()


def test_measure_pairs_each_reworded_report_with_its_original(monkeypatch, tmp_path):
    """The search end to end with a stand-in encoder whose sentence vector is the report's sides: a reworded
    report finds a training report on its own side, so sides are kept and zones only where that report has them."""
    import lvit.data
    import lvit.text

    near = load_bench("bench/nearest_report.py", "bench_nearest_report")
    upper_left = "Unilateral pulmonary infection, one infected area, upper left lung."

    class Record:
        def __init__(self, text):
            self.text = text

    class SidesEncoder:
        spec = "sides"

        def encode(self, texts):
            side = torch.tensor([[float("left" in t.lower()), float("right" in t.lower())] for t in texts])
            return side.unsqueeze(1), torch.ones(len(texts), 1, dtype=torch.bool)

    splits = {"train": [Record(upper_left), Record(RIGHT), Record(BOTH)], "test": [Record(LEFT), Record(RIGHT)]}
    monkeypatch.setattr(lvit.data, "load_split", lambda data, split: splits[split])
    monkeypatch.setattr(lvit.text, "get_text_encoder", lambda *a, **k: SidesEncoder())
    out = near.measure("QATA", "test", 0)
    assert out["training_reports"] == 3 and out["reports_in_training"] == 0.5
    original = out["rules"]["original"]  # LEFT finds "upper left" (same side, other zone); RIGHT finds itself
    assert original["images"] == 2 and original["sides_kept"] == 1.0 and original["zones_kept"] == 0.5
    digits = out["rules"]["digits"]  # both reports change ("one" -> "1"), and read as before
    assert digits["images"] == 2 and digits["zones_kept"] == 0.5 and digits["count_kept"] == 1.0
    assert out["rules"]["side-order"] == {"images": 0}  # both reports name one lung: nothing to reorder
    body = near.render({**out, "command": "c", "seconds": 1.0, "machine": "m"}, tmp_path / "RESULTS.md")
    assert "| side-order | 0 | n/a | n/a | n/a | n/a |" in body
