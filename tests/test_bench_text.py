"""benchmarks/bench_text.py: the offline real-sentence source (the model run is the benchmark)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_text", BENCH / "bench_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_sentences_from_stdlib_docstrings_are_prose_and_deterministic():
    bench = _load()
    found = bench.sentences(bench.stdlib_text())
    assert len(found) > 1500  # enough for 1024 + 256 without repeats
    assert found == bench.sentences(bench.stdlib_text())
    assert len(set(found)) == len(found)
    for s in found:
        assert 5 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?"
        assert ">>>" not in s


def test_sentences_of_a_text_file():
    bench = _load()
    text = ("Short one.\n\nThe quick brown fox jumps over the lazy dog. It was the best of times, "
            "it was the worst of times.\n\n>>> print('code is left out of the set here.')")
    assert bench.sentences(text) == ["The quick brown fox jumps over the lazy dog.",
                                     "It was the best of times, it was the worst of times."]
