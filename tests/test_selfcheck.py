"""The selfcheck entry point passes, and fails loudly when a backend is wrong."""
import torch

from clora_fast import selfcheck


def test_selfcheck_passes(capsys):
    assert selfcheck.main([]) == 0
    out = capsys.readouterr().out
    assert "available backends: reference" in out and "selfcheck passed" in out


def test_selfcheck_reports_a_wrong_backend(monkeypatch, capsys):
    from clora_fast import reference
    real = reference.forgetting_penalty_forward

    def wrong(past, a, b, scale):
        loss, da, db = real(past, a, b, scale)
        return (loss, da, db) if past.dtype == torch.float64 else (loss * 1.5, da, db)  # float64 stays the truth

    monkeypatch.setattr(reference, "forgetting_penalty_forward", wrong)
    monkeypatch.setattr(selfcheck.clora_fast, "available_backends", lambda: ["reference"])
    assert selfcheck.main([]) == 1
    assert "FAIL" in capsys.readouterr().out
