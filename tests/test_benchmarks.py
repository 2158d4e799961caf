"""The benchmark scripts refuse bad arguments before any timing starts."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import onnx_cpu  # noqa: E402
import quality  # noqa: E402
import throughput  # noqa: E402


@pytest.mark.parametrize("argv", [["--backends", "bogus"], ["--backends", ","], ["--batch-sizes", "0"],
                                  ["--batch-sizes", "a"], ["--sizes", "64,x"]])
def test_throughput_rejects_bad_lists(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.parse_args(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_throughput_parses_its_defaults():
    args = throughput.parse_args(["--quick", "--backends", "torch", "--batch-sizes", "1,4"])
    assert args.backends == ["torch"] and args.batch_sizes == [1, 4] and args.sizes == [64]


@pytest.mark.parametrize("argv", [["--sizes", "48"], ["--iters", "0"], ["--batch", "0"]])
def test_onnx_cpu_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        onnx_cpu.main(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_quality_rejects_zero_steps(capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--steps", "0"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err
