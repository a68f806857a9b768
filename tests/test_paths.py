"""cxr_core.paths: server folders stay inside the configured root."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_core.paths import escaping_links, list_images, locate, resolve_under, source_of, subfolders


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/{a/b/x.jpeg, a/y.dcm, a/notes.txt, a/IM000001, .hidden.png} and a sibling 'outside' folder."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "x.jpeg").write_bytes(b"x")
    (root / "a" / "y.dcm").write_bytes(b"y")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / "IM000001").write_bytes(b"dicom without extension")
    (root / ".hidden.png").write_bytes(b"h")
    (outside / "secret.png").write_bytes(b"s")
    return root, outside


def test_relative_nested_path_is_allowed(tree):
    root, _ = tree
    assert resolve_under(root, "a/b") == (root / "a" / "b").resolve()
    assert resolve_under(root, "") == root.resolve()
    assert resolve_under(root, "a/b/../b") == (root / "a" / "b").resolve()


def test_absolute_path_inside_root_is_allowed(tree):
    root, _ = tree
    assert resolve_under(root, str(root / "a")) == (root / "a").resolve()


@pytest.mark.parametrize("user_path", ["..", "../outside", "a/../../outside", "a/b/../../.."])
def test_dotdot_is_refused(tree, user_path):
    root, _ = tree
    with pytest.raises(ValueError, match="outside the data root"):
        resolve_under(root, user_path)


def test_absolute_path_elsewhere_is_refused(tree):
    root, outside = tree
    with pytest.raises(ValueError, match="Only folders inside the configured data root"):
        resolve_under(root, str(outside))
    with pytest.raises(ValueError, match="outside the data root"):
        resolve_under(root, "/etc")


def test_paths_outside_the_root_get_one_answer_whether_or_not_they_exist(tree):
    """No probing of the server's other folders: /etc/passwd and /etc/nope are refused alike."""
    root, outside = tree
    messages = []
    for user_path in ("/etc/passwd", "/etc/no-such-file-here", str(outside / "secret.png"), str(outside / "nope"),
                      "../nope", "../" + outside.name):
        with pytest.raises(ValueError) as err:
            resolve_under(root, user_path)
        messages.append(str(err.value).replace(user_path, "PATH"))
    assert len(set(messages)) == 1 and "outside the data root" in messages[0], messages


def test_missing_path_inside_root_says_it_does_not_exist(tree):
    root, _ = tree
    with pytest.raises(ValueError, match="does not exist"):
        resolve_under(root, "a/nope")
    with pytest.raises(ValueError, match="outside the data root"):
        resolve_under(root, "../nope")


def test_symlinked_dir_out_of_root_is_refused(tree):
    root, outside = tree
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="symlink"):
        resolve_under(root, "link_dir")


def test_symlinked_file_out_of_root_is_refused(tree):
    root, outside = tree
    (root / "a" / "link.png").symlink_to(outside / "secret.png")
    with pytest.raises(ValueError, match="outside the data root"):
        resolve_under(root, "a/link.png")


def test_symlink_inside_root_is_allowed(tree):
    root, _ = tree
    (root / "alias").symlink_to(root / "a" / "b", target_is_directory=True)
    assert resolve_under(root, "alias") == (root / "a" / "b").resolve()


def test_list_images_finds_images_and_extensionless_files_only(tree):
    root, _ = tree
    names = [p.relative_to(root.resolve()).as_posix() for p in list_images(root)]
    assert names == ["a/IM000001", "a/b/x.jpeg", "a/y.dcm"]
    assert [p.name for p in list_images(root / "a", recursive=False)] == ["IM000001", "y.dcm"]
    assert len(list_images(root, limit=2)) == 2


def test_list_images_does_not_follow_symlinks_out_of_root(tree):
    root, outside = tree
    (root / "a" / "link_dir").symlink_to(outside, target_is_directory=True)
    (root / "a" / "link.png").symlink_to(outside / "secret.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    found = list_images(root)
    assert all(outside.resolve() not in p.resolve().parents for p in found)
    assert "secret.png" not in {p.name for p in found}
    assert {p.name for p in found} >= {"x.jpeg", "y.dcm", "IM000001"}


def test_subfolders_lists_relative_dirs_without_symlinks(tree):
    root, outside = tree
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    assert subfolders(root) == ["a", "a/b"]


def test_locate_finds_split_rows_under_their_source(tmp_path):
    data = tmp_path / "data"
    (data / "kermany" / "train" / "NORMAL").mkdir(parents=True)
    (data / "covid" / "Normal").mkdir(parents=True)
    (data / "kermany" / "train" / "NORMAL" / "IM-1.jpeg").write_bytes(b"k")
    (data / "covid" / "Normal" / "n1.png").write_bytes(b"c")
    assert locate("NORMAL/IM-1.jpeg", "kermany", [data]) == (data / "kermany/train/NORMAL/IM-1.jpeg").resolve()
    assert locate("NORMAL/IM-1.jpeg", "kermany", [data / "kermany" / "train"]) is not None
    assert locate("Normal/n1.png", "covid", [tmp_path / "missing", data]) == (data / "covid/Normal/n1.png").resolve()
    assert locate("Normal/absent.png", "covid", [data]) is None
    assert locate("../../etc/passwd", "covid", [data]) is None
    assert source_of(data / "kermany" / "train") == "kermany" and source_of(data / "covid") == "covid"


def test_escaping_links_names_links_out_of_root_only(tree):
    root, outside = tree
    assert escaping_links(root, root) == []
    (root / "a" / "b" / "out_dir").symlink_to(outside, target_is_directory=True)
    (root / "a" / "out.png").symlink_to(outside / "secret.png")
    (root / "a" / "in.png").symlink_to(root / "a" / "b" / "x.jpeg")
    assert sorted(p.name for p in escaping_links(root / "a", root)) == ["out.png", "out_dir"]


def test_nul_byte_is_refused_with_the_same_message(tree):
    root, _ = tree
    with pytest.raises(ValueError, match="contains a NUL character. Only folders inside the configured data root"):
        resolve_under(root, "a\x00")


def test_a_link_out_of_the_root_gives_one_answer_whether_or_not_the_file_exists(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (root / "link").symlink_to(outside, target_is_directory=True)
    answers = []
    for name in ("link/secret.txt", "link/nope.txt"):
        with pytest.raises(ValueError) as err:
            resolve_under(root, name)
        answers.append(str(err.value).replace(name, "NAME"))
    assert answers[0] == answers[1] and "outside the data root" in answers[0]


def test_an_absolute_path_written_through_a_linked_root_is_inside_it(tmp_path):
    real = tmp_path / "real"
    (real / "films").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    assert resolve_under(alias, str(alias / "films")) == (real / "films").resolve()
    with pytest.raises(ValueError, match="outside the data root"):
        resolve_under(alias, str(alias / ".." / "real2"))
