import json

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[demo]')")

from lc_kernels.cli import main  # noqa: E402


@pytest.mark.slow
def test_demo_collapses_the_regularized_mlp_only(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--no-progress", "--json", str(out), "--latency-batch", "512"]) == 0
    text = capsys.readouterr().out
    assert "linear model (trivial baseline)" in text and "TOTAL" in text
    res = json.loads(out.read_text())
    plain, reg = res["results"]
    # the regularized model collapses at least half of its joints, losing <= 1.5 pp, no fine-tuning
    assert reg["linear_joints"] * 2 >= reg["joints"]
    assert reg["acc_before"] - reg["acc_after"] <= 0.015
    assert plain["acc_before"] - reg["acc_after"] <= 0.015
    assert reg["flops_after"] < reg["flops_before"] / 2
    # the unregularized model cannot: its slopes stay far from 1
    assert plain["linear_joints"] == 0
    assert max(abs(1 - a) for a in plain["alphas"].values()) > 0.3


def test_demo_help_documents_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--seed", "--epochs", "--strength", "--last-k", "--tol", "--json"):
        assert opt in text


def test_demo_rejects_bad_widths():
    with pytest.raises(SystemExit, match="--widths must start with 64"):
        main(["demo", "--widths", "32", "10"])
