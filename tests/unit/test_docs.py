"""The README and docs/ cannot drift from the code they describe.

    python -m pytest tests/unit/test_docs.py -q

docs/FIRST_RUN_SAGEMAKER.md and docs/FIRST_RUN_KUBERNETES.md are meant to be pasted into a shell. So every
`python launch/submit.py ...` command on them is parsed by the launcher's own argparse parser and then dry-run by
the launcher itself (shell variables replaced by the values the stack would give), every stack output and parameter
they name must exist in infra/cloudformation.yaml, every infra/build_and_push.sh flag must exist in the script, and
every shell variable a command uses must be set earlier on the page. In README.md and docs/: every QLORA_* name is a
setting of entrypoints/config.py, the demo's settings table is DEMO_SETTINGS, the exit-code table is
entrypoints/errors.py's, and every relative link (with its #anchor) resolves. (The settings table in
docs/SETTINGS.md is checked by tests/unit/test_config.py.)
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from entrypoints import errors
from entrypoints.config import FIELDS, env_name
from entrypoints.secrets import SECRET_NAMES
from launch import submit

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "docs" / "FIRST_RUN_SAGEMAKER.md", REPO / "docs" / "FIRST_RUN_KUBERNETES.md"]
# What the pages' shell variables hold after their earlier steps: the stack's outputs for account 111122223333.
SHELL_VALUES = {
    "BUCKET": "s3://qlora-job-111122223333-us-east-1",
    "REPO": "111122223333.dkr.ecr.us-east-1.amazonaws.com/qlora-job",
    "IMAGE": "111122223333.dkr.ecr.us-east-1.amazonaws.com/qlora-job:0123456789ab",
    "ROLE": "arn:aws:iam::111122223333:role/qlora-job-sagemaker-execution",
    "SECRET_ARN": "arn:aws:secretsmanager:us-east-1:111122223333:secret:qlora-job/job-AbCdEf",
    "JOB": "qlora-llama-2-7b-hf-20261130093000",
    "AWS_REGION": "us-east-1",
}
# QLORA_* names in the docs that are not settings, and why.
NOT_SETTINGS = {"QLORA_SUMMARY"}  # the prefix of the job's last stdout line (entrypoints/train.py SUMMARY_PREFIX)


def code_lines(page: Path) -> list[str]:
    """The lines inside the page's fenced code blocks, with backslash continuations joined."""
    lines, inside, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def submit_commands(page: Path) -> list[str]:
    return [line for line in code_lines(page) if line.lstrip().startswith("python launch/submit.py")]


def argv_of(command: str) -> list[str]:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in SHELL_VALUES, f"${name} in {command!r}: add its stack value to SHELL_VALUES"
        return SHELL_VALUES[name]

    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", value, command)
    words = shlex.split(expanded, comments=True)
    assert words[:2] == ["python", "launch/submit.py"], command
    return words[2:]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_submit_command_parses_and_dry_runs(page, capsys, monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    commands = submit_commands(page)
    assert len(commands) >= 3, f"{page.name}: expected the dry run, the submission and the resume"
    assert any("--dry-run" in c for c in commands) and any("--resume-from" in c for c in commands)
    parser = submit.build_parser()
    for command in commands:
        argv = argv_of(command)
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: the launcher's parser refuses {command!r}: {capsys.readouterr().err}")
        code = submit.main([a for a in argv if a not in ("--follow", "--wait")] + ["--dry-run"])
        err = capsys.readouterr().err
        assert code == 0, f"{page.name}: {command!r} exits {code} in a dry run:\n{err}"
        assert "placeholder" not in err, f"{page.name}: {command!r} leaves out a value needed to submit:\n{err}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_shell_variable_is_set_on_the_page_before_it_is_used(page):
    lines = code_lines(page)
    for number, line in enumerate(lines):
        for name in re.findall(r"\$\{?(\w+)", line):
            if name.isupper() and not line.lstrip().startswith("#"):
                earlier = lines[:number] + [line.split(name + "=", 1)[0]]
                assert any(re.search(rf"(^|\s|export\s){name}=", text) for text in earlier), \
                    f"{page.name}: ${name} is used in {line!r} before the page sets it"


def _template() -> dict:
    loader = type("CfnLoader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((REPO / "infra" / "cloudformation.yaml").read_text(), Loader=loader)


def test_stack_outputs_and_parameters_named_on_the_pages_exist():
    template = _template()
    for page in PAGES:
        text = page.read_text()
        outputs = set(re.findall(r"OutputKey=='(\w+)'", text))
        assert outputs, page.name
        assert outputs <= set(template["Outputs"]), f"{page.name}: {outputs - set(template['Outputs'])}"
        parameters = {m for line in code_lines(page) if "--parameter-overrides" in line
                      for m in re.findall(r"(\w+)=", line.split("--parameter-overrides", 1)[1])}
        table = re.findall(r"^\| `(\w+)` \| ", text.split("| parameter | default |", 1)[-1].split("\n\n", 1)[0], re.M) \
            if "| parameter | default |" in text else []
        assert parameters | set(table) <= set(template["Parameters"]), page.name
        for name in parameters | set(table):
            default = str(template["Parameters"][name].get("Default", ""))
            assert not table or f"| `{name}` | {f'`{default}`' if default else 'empty'} |" in text, \
                f"{page.name}: the default of {name} is {default!r} in the template"
    assert {"EksClusterName"} <= {m for line in code_lines(PAGES[1]) for m in re.findall(r"(\w+)=", line)}


def test_build_script_flags_on_the_pages_exist():
    script = (REPO / "infra" / "build_and_push.sh").read_text()
    for page in PAGES:
        for line in code_lines(page):
            if "infra/build_and_push.sh" in line:
                for flag in re.findall(r"\s(--[a-z-]+)", line):
                    assert f"{flag})" in script, f"{page.name}: infra/build_and_push.sh has no {flag}"


def test_every_qlora_name_in_the_docs_is_a_setting():
    settings = {env_name(name) for name in FIELDS}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        unknown = set(re.findall(r"QLORA_[A-Z0-9_]+", doc.read_text())) - settings - NOT_SETTINGS
        assert not unknown, f"{doc.relative_to(REPO)} names {sorted(unknown)}, which entrypoints/config.py does not define"


def test_the_pages_name_the_secrets_the_job_reads():
    for page in PAGES:
        text = page.read_text()
        for name in SECRET_NAMES:
            assert name in text, f"{page.name} does not say how to give {name}"


def _section(text: str, start: str, end: str) -> str:
    assert start in text and end in text, f"missing {start} ... {end}"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_readme_demo_settings_table_is_the_demos():
    """The README explains each of the demo's settings; the table must list exactly DEMO_SETTINGS, with the job's
    defaults beside them (read from the source, not imported: the demo module imports torch)."""
    tree = ast.parse((REPO / "entrypoints" / "demo" / "run.py").read_text())
    demo = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", "") == "DEMO_SETTINGS")
    table = _section((REPO / "README.md").read_text(), "<!-- demo-settings:start -->", "<!-- demo-settings:end -->")
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `(QLORA_\w+)` \| `([^`]*)` \| `([^`]*)` \| .+ \|$", table, re.M)}
    assert set(rows) == set(demo), f"README's demo table rows differ from DEMO_SETTINGS: {set(rows) ^ set(demo)}"
    for name, value in demo.items():
        default = FIELDS[name[len("QLORA_"):].lower()].default
        shown = "(empty)" if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        assert rows[name] == (value, shown), f"{name}: README says {rows[name]}, the code {(value, shown)}"


def test_the_readme_exit_code_table_is_the_jobs():
    table = _section((REPO / "README.md").read_text(), "### Exit codes\n", "\n\n")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    defined = {value for name, value in vars(errors).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert documented == defined, f"README exit codes {sorted(documented)} vs entrypoints/errors.py {sorted(defined)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_readme_and_docs_resolve():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in anchors, f"{doc.relative_to(REPO)} links to {target}: no such heading"
