from tests.common import assert_close

def test_a():
    assert_close(1.0, 1.0)
