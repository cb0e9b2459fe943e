"""The documentation site: it builds with MkDocs in strict mode (warnings are
errors), holds the API reference and the report figures, and every relative
link or image of docs/ points at a file that exists."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FIGURES = ("map", "trajectories", "spectra", "early")


def test_site_builds_strict_with_api_pages_and_figures(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"

    def page(path):
        return (site / path / "index.html").read_text(encoding="utf-8")

    callback = page("api/callback")
    assert 'id="keras_fim.FisherCallback"' in callback
    assert 'id="keras_fim.FisherModel"' in callback
    assert 'id="keras_fim.DynamicSampling"' in page("api/sampling")
    for name in (
        "measure",
        "per_example_gradients",
        "fisher_gram",
        "FisherMeasurement",
    ):
        assert f'id="keras_fim.{name}"' in page("api/measurement")
    models_data = page("api/models-data")
    assert 'id="keras_fim.models.cifar_resnet"' in models_data
    assert 'id="keras_fim.datasets"' in models_data
    study_reports = page("api/study-reports")
    assert 'id="keras_fim.study.run_study"' in study_reports
    assert 'id="keras_fim.reports.write_report"' in study_reports
    # Doctest examples render as code, not as Markdown block quotes.
    assert "<blockquote>" not in page("api/sampling")

    reading = page("reading")
    for name in FIGURES:
        assert (site / "figures" / f"{name}.png").stat().st_size > 0
        assert f'src="../figures/{name}.png"' in reading
    for name in ("quickstart", "concepts", "tensorboard", "sampling", "cli", "faq"):
        assert (site / name / "index.html").exists()
    # Build helpers are not published.
    assert not (site / "make_figures.py").exists()


# [text](target) and ![alt](target), outside code; "<...>" autolinks are not matched.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _relative_targets(markdown: str):
    inside_fence = False
    for number, line in enumerate(markdown.splitlines(), start=1):
        if _FENCE.match(line):
            inside_fence = not inside_fence
            continue
        if inside_fence:
            continue
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http:, mailto:, ... and anchors within the page
            yield number, target.split("#", 1)[0]


def test_relative_links_and_images_resolve():
    pages = sorted(DOCS.rglob("*.md"))
    assert pages
    missing = []
    for path in pages:
        for number, target in _relative_targets(path.read_text(encoding="utf-8")):
            if not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not missing, "broken relative links:\n" + "\n".join(missing)


def test_cli_help_in_the_docs_is_the_commands_own():
    """docs/cli.md quotes every command's --help; it must not go stale."""
    from click.testing import CliRunner

    from keras_fim_cli import main

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    blocks = re.findall(
        r"```text\n(Usage: keras-fim ((?:\w+ )?)\[OPTIONS\].*?)\n```", text, re.S
    )
    assert [command.strip() for _, command in blocks] == [
        "",
        "train",
        "study",
        "report",
    ]
    for quoted, command in blocks:
        printed = (
            CliRunner()
            .invoke(
                main,
                [*command.split(), "--help"],
                terminal_width=100,
                prog_name="keras-fim",
            )
            .output
        )
        assert quoted == printed.rstrip(), (
            f"regenerate: python docs/make_cli_help.py (`keras-fim {command}`)"
        )


def _api_reference_objects():
    """Every function and class the API reference pages render (a module's
    public functions and classes defined in it), loaded statically."""
    import griffe

    names = [
        line.split(":::", 1)[1].strip()
        for page in sorted((DOCS / "api").glob("*.md"))
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith(":::")
    ]
    package = griffe.load("keras_fim", search_paths=[str(ROOT)], resolve_aliases=True)
    seen = {}
    for name in names:
        found = package[name.removeprefix("keras_fim.")]
        found = found.final_target if found.is_alias else found
        members = found.members.values() if found.is_module else [found]
        for member in members:
            if member.is_alias or member.name.startswith("_"):
                continue
            if member.is_function or member.is_class:
                seen[member.path] = member
    return seen


def test_public_docstrings_document_every_argument_with_its_type():
    """Every parameter of the API reference's functions and constructors is
    annotated (mkdocstrings shows the type beside it) and has its own entry
    under Args (or Attributes, for NamedTuples and dataclasses)."""
    from griffe import ParameterKind

    variadic = (ParameterKind.var_positional, ParameterKind.var_keyword)
    gaps = []
    objects = _api_reference_objects()
    assert len(objects) > 40
    for path, obj in objects.items():
        function = obj.members.get("__init__") if obj.is_class else obj
        if function is None or function.is_alias:
            continue  # a class whose constructor is inherited (Keras's)
        documented = set()
        for section in obj.docstring.parse("google") if obj.docstring else []:
            if section.kind.value in ("parameters", "other parameters", "attributes"):
                documented |= {entry.name for entry in section.value}
        for parameter in function.parameters:
            if parameter.name in ("self", "cls") or parameter.kind in variadic:
                continue
            if parameter.name.startswith("_"):
                continue
            if parameter.annotation is None:
                gaps.append(f"{path}: `{parameter.name}` has no type annotation")
            if parameter.name not in documented:
                gaps.append(f"{path}: `{parameter.name}` is not under Args")
    assert not gaps, "\n".join(gaps)


def test_cli_option_tables_quote_the_commands_defaults():
    """Each `| --option | meaning | default |` row of docs/cli.md states the
    default that command's `--help` shows (nothing numeric where it has none)."""
    from keras_fim_cli import main

    checked = 0
    for section in re.split(r"^## ", (DOCS / "cli.md").read_text("utf-8"), flags=re.M):
        heading = section.splitlines()[0] if section else ""
        named = re.search(r"`keras-fim (\w+)`", heading)
        if named:
            commands = [named.group(1)]
        elif heading.startswith("Options shared by"):
            commands = re.findall(r"`(\w+)`", heading)
        else:
            continue
        rows = re.findall(
            r"^\| `(--[\w-]+)`(?: / `--[\w-]+`)? \|.*\| (.*) \|$", section, re.M
        )
        for command in commands:
            params = {
                flag: param
                for param in main.commands[command].params
                for flag in param.opts
            }
            for flag, quoted in rows:
                param = params[flag]
                default = param.default
                if isinstance(default, bool) and param.secondary_opts:
                    default = flag if default else param.secondary_opts[0]
                elif isinstance(default, bool):  # a flag: off unless given
                    default = None
                quoted = quoted.strip().strip("`")
                if default is None:
                    assert not quoted[:1].isdigit(), (command, flag)
                elif isinstance(default, float):
                    assert float(quoted) == default, (command, flag)
                else:
                    assert quoted == str(default), (command, flag)
                checked += 1
    assert checked > 20
