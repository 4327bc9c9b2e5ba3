"""How settings combine: profiles, files and flags override only what they name."""
from __future__ import annotations

import pytest

from pipeline.config import STUDENT_RECIPE, TrainConfig, resolve_config
from pipeline.errors import BadInputError
from pipeline.stages.distill import distill_settings_hash


def test_a_partial_student_train_keeps_the_student_recipe():
    """Regression: `student.train: {epochs: 3}` (the default profile, `pipeline distill --epochs 3`) replaced the
    student's recipe (lr 3e-3, wd 0.01, no clipping) with the teacher's (5e-4, 0.05, clip 1.0)."""
    plain = resolve_config().student.train
    for cfg in (resolve_config(profile="default"), resolve_config(overrides={"student": {"train": {"epochs": 7}}}),
                resolve_config(profile="tiny")):
        train = cfg.student.train
        assert (train.lr, train.weight_decay, train.grad_clip) == (plain.lr, plain.weight_decay, plain.grad_clip) \
            == (STUDENT_RECIPE["lr"], STUDENT_RECIPE["weight_decay"], STUDENT_RECIPE["grad_clip"])
    assert resolve_config(overrides={"student": {"train": {"epochs": 7}}}).student.train.epochs == 7
    given = resolve_config(overrides={"student": {"train": {"lr": 0.01}}}).student.train
    assert given.lr == 0.01 and given.weight_decay == STUDENT_RECIPE["weight_decay"]
    teacher = resolve_config(overrides={"teacher": {"train": {"epochs": 1}}}).teacher.train
    assert (teacher.lr, teacher.grad_clip) == (TrainConfig().lr, TrainConfig().grad_clip)


def test_the_distill_fingerprint_holds_every_method_option_with_its_default():
    """Options left at their defaults are fingerprinted by value: a run made when a default was different retrains
    instead of being skipped, while spelling out a default changes nothing."""
    base = resolve_config(overrides={"student": {"method": "kdiffusion"}})
    spelled = resolve_config(overrides={"student": {"method": "kdiffusion", "method_options": {"chain": "poster"}}})
    other = resolve_config(overrides={"student": {"method": "kdiffusion", "method_options": {"chain": "reduced"}}})
    assert distill_settings_hash(base, None) == distill_settings_hash(spelled, None)
    assert distill_settings_hash(base, None) != distill_settings_hash(other, None)


def test_the_default_profile_sizes_only_the_built_in_data():
    """The default profile's few-labels setting (students on 2000 images) and its subsets are for Fashion-MNIST:
    on a user's images the run uses every image, and a flag still overrides the profile."""
    builtin = resolve_config(profile="default")
    assert (builtin.data.subset, builtin.data.eval_subset, builtin.student.subset) == (None, 5000, 2000)
    assert (builtin.teacher.train.epochs, builtin.student.train.epochs) == (2, 15)
    theirs = resolve_config(overrides={"data": {"dataset": "imagefolder:/data/mine"}}, profile="default")
    assert (theirs.data.subset, theirs.data.eval_subset, theirs.student.subset) == (None, None, None)
    assert (theirs.teacher.train.epochs, theirs.student.train.epochs) == (2, 3)
    flagged = resolve_config(overrides={"student": {"subset": 500}}, profile="default")
    assert flagged.student.subset == 500
    # given fewer training images than the profile's few labels, the students take them all (no refusal of a
    # setting the user never made); a larger --subset keeps the profile's
    assert resolve_config(overrides={"data": {"subset": 128}}, profile="default").student.subset is None
    assert resolve_config(overrides={"data": {"subset": 3000}}, profile="default").student.subset == 2000


@pytest.mark.parametrize("text,expected", [
    ("for_dataset: [fashion-mnist]", "for_dataset must map dataset names to settings"),
    ("for_dataset: {fashion-mnist: 3}", "for_dataset must map dataset names to settings"),
    ("student: 5\nfor_dataset: {fashion-mnist: {data: {eval_subset: 10}}}", "invalid config: student"),
    ("data: {subset: 100}\nfor_dataset: {fashion-mnist: {student: {subset: lots}}}", "invalid config: student.subset"),
])
def test_a_malformed_profile_file_is_one_clear_error(text, expected, tmp_path):
    """`--profile PATH.yaml` reads a file from elsewhere: a malformed for_dataset or section is refused by name."""
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError, match=expected):
        resolve_config(profile=str(path))
