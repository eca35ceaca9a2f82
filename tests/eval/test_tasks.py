"""Task YAML: the shipped mmlu file loads; a malformed file names the file and the field."""

from __future__ import annotations

import pytest
import yaml

from lmlab.errors import LmlabError
from lmlab.eval.tasks import TASK_DIR, load_task

DOC = {"question": " 1+1? ", "choices": ["1", "2", "3", "4"], "answer": "B", "subject": "math"}


def write(tmp_path, **changes):
    spec = yaml.safe_load((TASK_DIR / "mmlu.yaml").read_text())
    spec.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del spec[k]
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_mmlu_renders_like_lm_evaluation_harness():
    task = load_task("mmlu")
    assert task.context(DOC, []) == (
        "The following are multiple choice questions (with answers) about math.\n\n1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert task.doc_choices(DOC) == ["A", "B", "C", "D"] and task.doc_target(DOC) == 1


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"choices": ["only one"]}, "choices"),
        ({"chat_template": "yes"}, "chat_template"),
        ({"promt": "typo"}, "promt"),
        ({"prompt": "{{ question "}, "prompt"),
        ({"subjects": "math"}, "subjects"),
    ],
)
def test_malformed_task_names_file_and_field(tmp_path, changes, field):
    p = write(tmp_path, **changes)
    with pytest.raises(LmlabError) as e:
        load_task(p)
    assert e.value.file == str(p) and e.value.field == field
    assert str(p) in str(e.value) and field in str(e.value)


def test_bad_target_at_render_time_names_field(tmp_path):
    task = load_task(write(tmp_path, target="{{ answer }}{{ answer }}"))
    with pytest.raises(LmlabError, match="target"):
        task.doc_target(DOC)


def test_unknown_task_and_invalid_yaml(tmp_path):
    with pytest.raises(LmlabError, match="unknown task"):
        load_task("nope")
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(LmlabError, match="invalid YAML") as e:
        load_task(p)
    assert e.value.file == str(p)
