import os
import stat

from pronghorn.files import atomic_dir, chmod_like_mkdir


def test_chmod_like_mkdir_gives_an_atomic_dir_the_permissions_of_mkdir(tmp_path):
    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # tempfile.mkdtemp's
        chmod_like_mkdir(tmp)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
