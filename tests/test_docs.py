"""Docs that hold: the README's quick start runs, the files its text names exist, the CHANGELOG agrees with the
package version."""

import re
from pathlib import Path

from packaging.version import Version

import trl_rpo


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _run_python_blocks(text: str, where: str, model_dir: str) -> list[dict]:
    """Run every Python block of `text` in order, with each Hub model id swapped for the tiny offline model and each
    trainer config capped at two steps; return each block's namespace."""
    namespaces = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        for model_id in re.findall(r'model="([^"]+)"', block):
            block = block.replace(f'"{model_id}"', repr(model_dir))
        block = re.sub(r"\b(RPOConfig|DROConfig)\(", r"\1(report_to='none', max_steps=2, ", block)
        namespace = {}
        exec(compile(block, where, "exec"), namespace)  # noqa: S102
        namespaces.append(namespace)
    return namespaces


def test_quick_start_runs(model_dir, tmp_path, monkeypatch):
    """Every Python block of the quick start, with the Hub model id swapped for the tiny offline model."""
    monkeypatch.chdir(tmp_path)
    quick_start = _section(README, "Quick start")
    assert re.findall(r'model="([^"]+)"', quick_start), "the quick start should name a model"
    namespaces = _run_python_blocks(quick_start, "README quick start", model_dir)
    assert namespaces
    trainer = namespaces[-1]["trainer"]
    assert trainer.state.global_step == 2
    assert len(trainer.train_dataset) == 5


DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_paths_named_in_the_readmes_exist():
    for readme in (ROOT / "README.md", ROOT / "recipes" / "README.md", *DOCS):
        spans = re.findall(r"`([^`\s]+)`", readme.read_text())
        paths = [s for s in spans if re.fullmatch(r"(?:[\w.-]+/)+[\w.-]*\.(?:py|yaml|json|jsonl|md|ipynb)", s)]
        assert paths or readme in DOCS, readme
        for path in paths:
            relative = path.split("/", 1)[1] if path.startswith("trl/") else path  # TRL's own files
            candidates = [ROOT / path, ROOT / "recipes" / path, ROOT / "benchmarks" / path]
            if path.startswith("trl/"):
                candidates.append(Path(__import__("trl").__file__).parent / relative)
            assert any(c.exists() for c in candidates), f"{readme.name} names {path}, which does not exist"


def test_changelog_agrees_with_the_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    version = Version(trl_rpo.__version__)
    released = [Version(h) for h in headings if h != "Unreleased"]
    if version.is_devrelease:  # work in progress: listed under [Unreleased], above every release older than it
        assert headings[0] == "Unreleased"
        assert all(v < version for v in released)
    else:
        assert headings[0] == str(version) or headings[:2] == ["Unreleased", str(version)]
    assert "keepachangelog.com" in changelog


def test_relative_links_resolve():
    """Every relative link of the READMEs and docs/ pages points at a file that exists (anchors aside)."""
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *DOCS]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            checked += 1
    assert checked > 5


def test_readme_links_every_docs_page():
    """The README is the front door: every page of docs/ is reachable from it."""
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README))
    assert linked == {page.name for page in DOCS}


def test_configuration_page_lists_every_rpo_option_with_its_default():
    """docs/configuration.md's option table has one row per field RPOConfig adds to KTOConfig, default included."""
    import dataclasses

    from trl import KTOConfig

    from trl_rpo import RPOConfig

    table = (ROOT / "docs" / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", table, flags=re.MULTILINE))
    kto_fields = {f.name for f in dataclasses.fields(KTOConfig)}
    added = [f for f in dataclasses.fields(RPOConfig) if f.name not in kto_fields]
    assert added
    for field in added:
        assert field.name in rows, f"docs/configuration.md has no row for `{field.name}`"
        assert rows[field.name] == repr(field.default).replace("'", '"'), field.name
    assert rows["beta"] == repr(RPOConfig.__dataclass_fields__["beta"].default)


PAGES_WITH_CODE = ["configuration.md", "dro.md", "loss.md", "pipeline.md"]


def test_python_blocks_of_the_docs_run(model_dir, tmp_path, monkeypatch):
    """Each docs page's Python blocks run on tiny models; a page that trains shows it trained (its asserts are part of
    its blocks)."""
    monkeypatch.chdir(tmp_path)
    with_code = [page.name for page in DOCS if "```python" in page.read_text()]
    assert with_code == PAGES_WITH_CODE  # a new page with code joins the list (and so this test) on purpose
    for name in with_code:
        for namespace in _run_python_blocks((ROOT / "docs" / name).read_text(), f"docs/{name}", model_dir):
            if "trainer" in namespace:
                assert namespace["trainer"].state.global_step == 2, name
    assert (tmp_path / "qwen-dro" / "value_head.safetensors").is_file()  # docs/dro.md's save_model
