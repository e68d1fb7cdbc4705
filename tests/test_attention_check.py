"""tools/attention_check.py: its verdict comes from the numbers, and bad
cases are refused before anything compiles."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import attention_check  # noqa: E402


def test_an_implementation_that_differs_is_not_equal(monkeypatch):
    """dpa with its logits scaled by 1.1 (a plausible kernel bug) fails the
    check, while bf16 xla stays close to float32 xla."""
    from t5lab.models import attention

    real = attention.dot_product
    monkeypatch.setattr(attention, "dot_product",
                        lambda q, k, v, m, b=None, *, scale, implementation:
                        real(q, k, v, m, b, scale=scale * 1.1, implementation=implementation))
    (case,) = attention_check.run("dpa", attention_check.parse_cases("decoder:unscanned:unpacked"), 24, 16)["cases"]
    assert case["ok"] is False and case["impl_logits"] > 2 * case["xla_logits"], case
    assert case["xla_logits"] < 0.05, case


def test_a_bad_case_is_refused_naming_the_flag():
    p = subprocess.run([sys.executable, "tools/attention_check.py", "--cases", "decoder:sideways"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--cases" in p.stderr and "decoder:sideways" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "tools/gpu_bench.py", "--cpu-smoke", "--check-cases", "nosuch:scanned"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--check-cases" in p.stderr and "nosuch" in p.stderr, p.stderr
