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


def test_selfcheck_checks_both_merged_functions(monkeypatch, capsys):
    """The merged strategy is checked through the Python Function and the C++ one (here a wrong stand-in
    for the host extension, which must be reported while the Python one passes)."""
    from clora_fast import ops
    real = ops._MergedLoRAFunction.apply

    def wrong_cpp(x, Ws, As, Bs, bias, pad, scales, split, grad_enabled):
        outs = real(x, bias, tuple(scales), split, len(Ws), len(As), *Ws, *As, *Bs)
        return [o * 1.5 for o in outs]

    monkeypatch.setattr(ops, "_CPP_MERGED", [wrong_cpp])
    monkeypatch.setattr(selfcheck.clora_fast, "available_backends", lambda: ["reference"])
    assert selfcheck.main([]) == 1
    out = capsys.readouterr().out
    assert "C++ autograd Function of clora_fast._host" in out
    assert "[FAIL] merged/cpp" in out and "[ok] merged/python float32" in out


def test_selfcheck_device_that_cannot_be_used(capsys):
    """A bogus device, or cuda without a GPU: one clear line and exit 2 (a traceback, or every check listed as
    FAIL, before)."""
    assert selfcheck.main(["--device", "bogus"]) == 2
    assert "--device 'bogus' cannot be used here" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert selfcheck.main(["--device", "cuda"]) == 2
        assert "--device 'cuda' cannot be used here" in capsys.readouterr().err
