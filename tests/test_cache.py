from pronghorn.cache import cache_root
from pronghorn.data.prepare import default_cache_dir
from pronghorn.models import default_model as dm


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PRONGHORN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "pronghorn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "pronghorn"
    monkeypatch.setenv("PRONGHORN_CACHE", str(tmp_path / "pc"))
    assert cache_root() == tmp_path / "pc"
    monkeypatch.setenv("PRONGHORN_CACHE", "~/pc")
    assert cache_root() == tmp_path / "home" / "pc"


def test_pronghorn_cache_moves_model_and_tokenized_caches(monkeypatch, tmp_path):
    """The default model's converted checkpoint and the tokenized-dataset cache both live under $PRONGHORN_CACHE."""
    for name, where in (("PRONGHORN_CACHE", "pc"), ("XDG_CACHE_HOME", "xdg")):
        monkeypatch.delenv("PRONGHORN_CACHE", raising=False)
        monkeypatch.setenv(name, str(tmp_path / where))
        model_dir = cache_root() / "models" / dm.DEFAULT_MODEL_NAME
        model_dir.mkdir(parents=True)
        for file in dm.REQUIRED_FILES:
            (model_dir / file).write_text("x")  # complete: used as is, nothing is built
        assert dm.default_model_dir(progress=False) == model_dir
        assert default_cache_dir() == cache_root() / "tokenized"
        assert model_dir.is_relative_to(tmp_path / where) and default_cache_dir().is_relative_to(tmp_path / where)
