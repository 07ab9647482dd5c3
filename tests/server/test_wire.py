"""The wire contract: tensors encode and decode exactly; the generated code is up to date."""

import re
import sys

import numpy as np
import pytest

from client._convert import decode, encode
from server import wire

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_tensors_round_trip_little_endian(dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 1.5).astype(dtype)
    message = encode(array)
    assert message.dtype == dtype and list(message.shape) == [2, 3, 4]
    assert message.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(wire.decode_tensor(message, "x"), array)
    np.testing.assert_array_equal(decode(wire.encode_tensor(array)), array)


def test_big_endian_input_is_sent_as_little_endian():
    array = np.arange(3, dtype=">f4")
    np.testing.assert_array_equal(decode(encode(array)), array.astype("<f4"))


def _without_generator_versions(text: str) -> str:
    """Generated code stamps the grpcio-tools and protobuf versions that wrote it; any release in
    the pinned ranges writes the same code apart from those stamps."""
    text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = ?", text)
    text = re.sub(r"# Protobuf Python Version: \S+", "# Protobuf Python Version: ?", text)
    return re.sub(r"(_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,", r"\1 ?,", text)


def test_generated_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        from generate import OUTPUTS, generate, generated_files
    finally:
        sys.path.pop(0)
    written = generate(tmp_path)
    assert written, "proto/generate.py wrote nothing"
    for path in written:
        fresh, checked_in = ((root / path).read_text() for root in (tmp_path, ROOT))
        assert _without_generator_versions(fresh) == _without_generator_versions(checked_in), (
            f"{path} is stale: run python proto/generate.py"
        )
    in_checkout = [path for package in OUTPUTS for path in generated_files(ROOT, package)]
    assert sorted(in_checkout) == sorted(written), "generated files without a proto: run python proto/generate.py"


def test_generated_stubs_need_no_newer_grpcio_than_the_sdk_requires():
    """The stubs refuse to import under a grpcio older than their stamp, so the stamp must not pass
    the SDK's floor (regenerating with a newer grpcio-tools raises it: lower the stamp or the floor)."""
    stamp = re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'", (ROOT / "client/odeserve/v1/odeserve_pb2_grpc.py").read_text()
    )
    floor = re.search(r'"grpcio>=([\d.]+)', (ROOT / "client/pyproject.toml").read_text())
    version = lambda text: tuple(int(part) for part in text.split("."))  # noqa: E731
    assert stamp and floor and version(stamp[1]) <= version(floor[1]), (stamp and stamp[1], floor and floor[1])
