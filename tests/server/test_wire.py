"""The wire contract: tensors encode and decode exactly; the generated code is up to date."""

import filecmp
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


def test_generated_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        from generate import OUTPUTS, generate, generated_files
    finally:
        sys.path.pop(0)
    written = generate(tmp_path)
    assert written, "proto/generate.py wrote nothing"
    for path in written:
        assert filecmp.cmp(tmp_path / path, ROOT / path, shallow=False), (
            f"{path} is stale: run python proto/generate.py"
        )
    in_checkout = [path for package in OUTPUTS for path in generated_files(ROOT, package)]
    assert sorted(in_checkout) == sorted(written), "generated files without a proto: run python proto/generate.py"
