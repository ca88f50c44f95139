"""Config you can trust: recipe files are read safely and every mistake is one line naming the file and
line or the key; "did you mean" knows the names other tools use; a setting that would be ignored is
refused, unless a nearer choice (an override, a child recipe, a sweep's trial) switched it off."""

import logging
from pathlib import Path

import pytest
import yaml
from battery import refuses
from conftest import tiny_recipe

import recipes
from finetune import Recipe, features
from finetune.config import RecipeError, known_keys
from finetune.recipe_checks import ALIASES, UNUSED, suggest
from finetune.recipe_file import load_yaml

VALID = "backbone: {name: b}\ndata: {path: d}\n"


def write(tmp_path: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    """A recipe file in tmp_path; run folders it might make would land in tmp_path/run (they must not)."""
    path = tmp_path / name
    if isinstance(text, str):
        text = text.replace("OUTPUT", f"output: {{dir: {tmp_path / 'run'}}}")
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


# --- bad recipe files, through the command line ---------------------------------------------------------

FILES = {
    "duplicate-section": ("backbone: {name: b}\ndata: {path: d}\ntrain:\n  lr: 0.1\ntrain:\n  epochs: 1\nOUTPUT\n",
                          ["r.yaml line 5", "duplicate key 'train'", "first at line 3"]),
    "duplicate-nested-key": (VALID + "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\nOUTPUT\n",
                             ["r.yaml line 6", "'train.lr'", "first at line 4"]),
    "duplicate-in-flow-mapping": (VALID + "head: {dropout: 0.1, type: mlp, dropout: 0.2}\nOUTPUT\n",
                                  ["r.yaml line 3", "'head.dropout'", "first at line 3"]),
    "syntax-unclosed-brace": ("backbone: {name: b}\ndata: {path: d\ntrain: {lr: 1}\nOUTPUT\n",
                              ["r.yaml line 3", "YAML syntax error"]),
    "syntax-tab-indent": (VALID + "train:\n\tlr: 1\nOUTPUT\n", ["r.yaml line 4", "'\\t'"]),
    "python-tag": (VALID + 'name: !!python/object/apply:os.system ["touch hacked"]\nOUTPUT\n',
                   ["r.yaml line 3", "!!python/object/apply:os.system"]),
    "unknown-tag": (VALID + "train: !include train.yaml\nOUTPUT\n", ["r.yaml line 3", "!include"]),
    "empty-file": ("", ["r.yaml", "empty"]),
    "only-comments": ("# a recipe, some day\n", ["r.yaml", "empty"]),
    "a-list": ("- backbone\n- data\n", ["r.yaml", "mapping", "list"]),
    "control-character": (VALID + 'name: "a\x01b"\nOUTPUT\n', ["r.yaml line 3", "not allowed"]),
    "base-missing": ("base: nothere.yaml\ntrain: {lr: 0.1}\n", ["r.yaml line 1", "base:", "nothere.yaml"]),
    "base-empty": ("base:\ntrain: {lr: 0.1}\n", ["r.yaml line 1", "base:"]),
    "typo-learning-rate": (VALID + "train: {learnig_rate: 0.1}\nOUTPUT\n",
                           ["train.learnig_rate", "r.yaml line 3", "did you mean 'train.lr'"]),
    "foreign-name-num-epochs": (VALID + "train:\n  num_epochs: 2\nOUTPUT\n", ["train.num_epochs", "'train.epochs'"]),
    "model-instead-of-backbone": ("model: bert-base-uncased\ndata: {path: d}\nOUTPUT\n",
                                  ["'model'", "'backbone.name'"]),
    "wrong-type": (VALID + "train:\n  lr: fast\nOUTPUT\n", ["train.lr", "'fast'", "r.yaml line 4"]),
    "missing-section": ("backbone: {name: b}\nOUTPUT\n", ["data", "required", "r.yaml"]),
    "lora-under-head-only": (VALID + "policy:\n  kind: head_only\n  lora: {rank: 4}\nOUTPUT\n",
                             ["policy.lora.rank=4", "r.yaml line 5", "policy.kind=head_only"]),
    "lora-defaults-written-under-full": (VALID + "policy:\n  lora:\n    rank: 8\nOUTPUT\n",
                                         ["policy.lora.rank=8", "policy.kind=full"]),
    "freeze-under-lora": (VALID + "policy: {kind: lora, freeze_layers: 2}\nOUTPUT\n",
                          ["policy.freeze_layers=2", "policy.kind=lora"]),
    "cache-features-nothing-frozen": (VALID + "train: {cache_features: true}\nOUTPUT\n",
                                      ["train.cache_features=true", "r.yaml line 3", "policy.kind=full"]),
    "merge-lora-under-full": (VALID + "output: {merge_lora: true, dir: run}\n", ["output.merge_lora=true"]),
    "hidden-size-linear-head": (VALID + "head: {type: linear, hidden_size: 64}\nOUTPUT\n",
                                ["head.hidden_size=64", "head.type=linear"]),
    "sparsity-with-heads": (VALID + "prune: {method: heads, sparsity: 0.3}\nOUTPUT\n",
                            ["prune.sparsity=0.3", "prune.method=heads"]),
    "recovery-lr-without-epochs": (VALID + "prune: {method: magnitude, finetune_lr: 0.001}\nOUTPUT\n",
                                   ["prune.finetune_lr=0.001", "prune.finetune_epochs=0"]),
    "test-samples-without-test": ("backbone: {name: b}\ndata:\n  path: d\n  splits: {test: null}\n"
                                  "  max_test_samples: 10\nOUTPUT\n", ["data.max_test_samples=10", "r.yaml line 5"]),
}


@pytest.mark.parametrize("case", FILES, ids=list(FILES))
def test_bad_recipe_file_is_one_line_naming_file_line_or_key(case, tmp_path, capsys):
    text, names = FILES[case]
    path = write(tmp_path, text)
    refuses(capsys, ["train", "--recipe", str(path)], names, tree=tmp_path)


def test_non_utf8_file_names_the_line_and_byte(tmp_path, capsys):
    path = write(tmp_path, VALID.encode() + "name: caf\u00e9\n".encode("latin-1"))
    refuses(capsys, ["train", "--recipe", str(path)], ["r.yaml line 3", "not UTF-8", "byte 45"], tree=tmp_path)


def test_base_cycle_names_base_and_the_chain(tmp_path, capsys):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    refuses(capsys, ["train", "--recipe", str(tmp_path / "a.yaml")],
            ["b.yaml line 1", "base:", "cycle", "a.yaml -> b.yaml -> a.yaml"], tree=tmp_path)


def test_a_problem_inside_the_base_names_the_base_file(tmp_path, capsys):
    write(tmp_path, VALID + "train: {lr: 1}\ntrain: {lr: 2}\n", "parent.yaml")
    path = write(tmp_path, "base: parent.yaml\nname: child\nOUTPUT\n", "child.yaml")
    refuses(capsys, ["train", "--recipe", str(path)], ["parent.yaml line 4", "duplicate key 'train'"], tree=tmp_path)


def test_a_child_cannot_set_what_its_base_switched_off(tmp_path, capsys):
    """The base chose kind=full; LoRA keys in the child have no effect there and are refused, at the child's line."""
    write(tmp_path, VALID + "policy: {kind: full}\n", "parent.yaml")
    path = write(tmp_path, "base: parent.yaml\npolicy:\n  lora: {rank: 4}\nOUTPUT\n", "child.yaml")
    refuses(capsys, ["train", "--recipe", str(path)], ["policy.lora.rank=4", "child.yaml line 3"], tree=tmp_path)


def test_override_that_would_be_ignored_is_refused(tmp_path, capsys):
    path = write(tmp_path, VALID + "OUTPUT\n")
    refuses(capsys, ["train", "--recipe", str(path), "policy.lora.rank=4"], ["policy.lora.rank=4", "policy.kind=full"],
            tree=tmp_path)


def test_override_with_a_foreign_name_suggests_the_key(tmp_path, capsys):
    path = write(tmp_path, VALID + "OUTPUT\n")
    refuses(capsys, ["train", "--recipe", str(path), "train.learning_rate=1e-4"],
            ["train.learning_rate", "did you mean 'train.lr'"], tree=tmp_path)


def test_merge_flag_on_a_full_recipe_is_refused(tmp_path, capsys):
    path = write(tmp_path, VALID + "OUTPUT\n")
    refuses(capsys, ["train", "--recipe", str(path), "--merge"], ["output.merge_lora=true", "policy.kind=full"],
            tree=tmp_path)


def test_a_folder_as_recipe_is_named(tmp_path, capsys):
    refuses(capsys, ["train", "--recipe", str(tmp_path)], ["--recipe", "folder"], tree=tmp_path)


def test_a_misspelt_shipped_recipe_suggests_the_name(tmp_path, capsys):
    refuses(capsys, ["train", "--recipe", "sst2_minilm_lroa"], ["--recipe", "did you mean 'sst2_minilm_lora'"],
            tree=tmp_path)


# --- reading stays plain and safe ---------------------------------------------------------------------------


def test_nothing_in_a_refused_file_is_evaluated(tmp_path):
    path = write(tmp_path, VALID + f'name: !!python/object/apply:os.system ["touch {tmp_path}/hacked"]\n')
    with pytest.raises(RecipeError, match="not allowed"):
        Recipe.from_yaml(path)
    assert not (tmp_path / "hacked").exists()


def test_anchors_merge_keys_and_plain_tags_still_work(tmp_path):
    """Plain YAML a user may rely on stays accepted: anchors, aliases, merge keys, a byte-order mark, !!str."""
    text = "\ufeffbackbone: {name: b}\ndata: {path: d, labels: [!!str 0, '1']}\neval: {metrics: &m [accuracy]}\n"
    recipe = Recipe.from_yaml(write(tmp_path, text))
    assert recipe.data.labels == ["0", "1"] and recipe.eval.metrics == ["accuracy"]
    data, lines = load_yaml(write(tmp_path, "a: &t {lr: 0.1}\nb:\n  <<: *t\n  epochs: 2\n", "merge.yaml"))
    assert data["b"] == {"lr": 0.1, "epochs": 2} and lines == {"a": 1, "a.lr": 1, "b": 2, "b.epochs": 4}


def test_shipped_base_by_name_with_or_without_yaml(tmp_path):
    for base in ("sst2_minilm_lora", "sst2_minilm_lora.yaml"):
        path = write(tmp_path, f"base: {base}\ntrain: {{epochs: 1}}\n")
        recipe = Recipe.from_yaml(path)
        assert recipe.policy.kind == "lora" and recipe.train.epochs == 1


def test_messages_are_one_line_and_name_every_key(tmp_path):
    path = write(tmp_path, VALID + "train: {lr: -1, batch_size: 0}\nhead: {dropout: 3}\n")
    with pytest.raises(RecipeError) as caught:
        Recipe.from_yaml(path)
    message = str(caught.value)
    assert "\n" not in message
    for key in ("train.lr", "train.batch_size", "head.dropout"):
        assert f"{key}: " in message
    assert message.count("r.yaml line") == 3


# --- "did you mean" -------------------------------------------------------------------------------------


@pytest.mark.parametrize("typed, meant", [
    ("train.learnig_rate", "train.lr"), ("train.learning_rate", "train.lr"), ("lr", "train.lr"),
    ("learning_rate", "train.lr"), ("train.lrr", "train.lr"), ("num_epochs", "train.epochs"),
    ("train.epoch", "train.epochs"), ("batch", "train.batch_size"), ("train.bs", "train.batch_size"),
    ("data.batch_size", "train.batch_size"), ("train.batch_sise", "train.batch_size"),
    ("lora_rank", "policy.lora.rank"), ("policy.lora.r", "policy.lora.rank"), ("model", "backbone.name"),
    ("model_name", "backbone.name"), ("max_seq_length", "data.max_length"), ("data.max_len", "data.max_length"),
    ("data.max_lenght", "data.max_length"), ("policy.kindd", "policy.kind"), ("lora", "policy.lora"),
    ("train.Learning-Rate", "train.lr"), ("head.dropuot", "head.dropout"),
    ("policy.lora.dropuot", "policy.lora.dropout"), ("eval.metric", "eval.metrics"),
    ("metric_for_best_model", "eval.primary"),
    ("train.num_train_epochs", "train.epochs"), ("per_device_train_batch_size", "train.batch_size"),
])
def test_suggestion_by_last_part_and_alias(typed, meant):
    assert suggest(typed, known_keys()) == meant


def test_no_suggestion_for_nonsense():
    assert suggest("zzqx", known_keys()) is None


def test_every_alias_names_a_real_key():
    assert set(ALIASES.values()) <= set(known_keys())
    assert {rule.key for rule in UNUSED} <= set(known_keys())


# --- settings without effect --------------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path):
    return tiny_recipe(Path("backbone"), Path("data"), tmp_path)


def test_a_chosen_kind_clears_what_it_switches_off(base, caplog):
    """Overriding policy.kind over a LoRA recipe drops its LoRA settings (logged), so compare variants and
    command-line switches work; the recipe (and its saved recipe.yaml) shows what runs."""
    lora = base.with_overrides(["policy.kind=lora", "policy.lora.rank=4", "policy.lora.alpha=8"])
    with caplog.at_level(logging.WARNING, logger="finetune"):
        full = lora.with_overrides(["policy.kind=full"])
    assert full.policy.kind == "full" and full.policy.lora.rank == 8 and full.policy.lora.alpha == 16
    assert "policy.lora.rank=4 has no effect with policy.kind=full" in caplog.text
    assert yaml.safe_load(full.to_yaml())["policy"]["lora"]["rank"] == 8


def test_a_child_recipe_may_switch_off_its_base(tmp_path):
    """The shipped LoRA recipe as a base, with kind=full in the child: its LoRA section falls back."""
    path = write(tmp_path, "base: sst2_minilm_lora\npolicy: {kind: full}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.policy.kind == "full" and recipe.policy.lora == type(recipe.policy.lora)()


def test_saved_and_round_tripped_recipes_load(base, tmp_path):
    """A recipe written out whole (every section, defaults included) is not taken as choosing its defaults."""
    for recipe in (base, base.with_overrides(["policy.kind=head_only"]), recipes.sst2_minilm_head(),
                   base.with_overrides(["prune.method=heads"])):
        (tmp_path / "saved.yaml").write_text(recipe.to_yaml())
        assert Recipe.from_yaml(tmp_path / "saved.yaml") == recipe
        assert recipe.with_overrides([]) == recipe


def test_an_assignment_that_leaves_a_setting_idle_is_refused_at_run(base):
    recipe = base.with_overrides(["policy.kind=lora", "policy.lora.rank=4"])
    recipe.policy.kind = "full"  # the LoRA section stays behind, and the run would ignore it
    with pytest.raises(RecipeError, match=r"policy\.lora\.rank=4 has no effect with policy\.kind=full"):
        Recipe.from_dict(recipe.to_dict())  # what run() does first


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match=r"train\.cache_features=true has no effect"):
        Recipe(backbone={"name": "b"}, data={"path": "d"}, train={"cache_features": True})


def test_cache_features_false_is_what_runs_anyway(base):
    assert base.with_overrides(["train.cache_features=false"]).train.cache_features is False


@pytest.mark.parametrize("policy, task, pretrained", [
    ({"kind": "head_only"}, "classification", True), ({"kind": "head_only"}, "token_classification", True),
    ({"kind": "head_only"}, "classification", False), ({"kind": "full"}, "classification", True),
    ({"kind": "lora"}, "classification", True), ({"kind": "freeze", "freeze_layers": 1}, "classification", True),
    ({"kind": "freeze", "freeze_embeddings": True, "freeze_layers": 1}, "classification", True),
    ({"kind": "freeze", "freeze_embeddings": True}, "classification", True),
])
def test_cache_rule_agrees_with_the_feature_cache(policy, task, pretrained, tmp_path):
    """train.cache_features=true is refused exactly where finetune.features would not cache."""
    recipe = Recipe.from_dict({"task": task, "backbone": {"name": "b", "pretrained": pretrained},
                               "data": {"path": "d"}, "policy": policy,
                               "eval": {"metrics": ["accuracy"] if task == "classification" else ["entity_f1"]}})
    try:
        recipe.with_overrides(["train.cache_features=true"])
        refused = False
    except RecipeError as err:
        assert "train.cache_features=true has no effect" in str(err)
        refused = True
    assert refused == (not features.applies(recipe))


def test_prune_flags_the_method_ignores_are_refused(tmp_path, capsys):
    """`finetune prune` builds the prune section from flags: --sparsity with --method heads is refused early."""
    from finetune.config import PruneConfig

    with pytest.raises(ValueError, match=r"prune\.sparsity=0\.3 has no effect with prune\.method=heads"):
        PruneConfig(method="heads", sparsity=0.3)
    assert PruneConfig(method="magnitude", sparsity=0.3).sparsity == 0.3


# --- sweeps: a searched key that a trial's other choice switches off is not an error -------------------


def test_sweep_over_kind_and_lora_rank_runs_every_trial(tiny_backbone, sentiment_dir, tmp_path):
    """policy.kind in [full, lora] x policy.lora.rank in [4]: the full trial drops the rank (it has no
    effect there) instead of failing, and the LoRA trial really uses it."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path,
                         train={"max_steps": 2, "eval_every": 2, "epochs": 1}, data={"path": str(sentiment_dir),
                                                                                   "columns": {"text": "sentence"},
                                                                                   "max_length": 16,
                                                                                   "max_train_samples": 32})
    result = recipe.sweep({"policy.kind": ["full", "lora"], "policy.lora.rank": [4]}, method="grid",
                          dir=str(tmp_path / "sweep"), keep_top_k=None, measure_cost=False)
    assert len(result.trials) == 2
    assert all(t["state"] == "COMPLETE" for t in result.trials), [t.get("error") for t in result.trials]
    for trial in result.trials:
        used = Recipe.from_yaml(result.sweep_dir / trial["model"] / "recipe.yaml")
        if "policy.kind=lora" in trial["overrides"]:
            assert used.policy.kind == "lora" and used.policy.lora.rank == 4
        else:
            assert used.policy.kind == "full" and used.policy.lora.rank == 8  # what ran: the rank fell back


def test_a_sweep_trial_recipe_is_built_the_way_the_runner_builds_it(base):
    """The runner checks each searched value alone before any trial (a lone rank over a full recipe must not
    fail there as 'KEY: ...'), then builds each trial from all its choices."""
    with pytest.raises(RecipeError) as caught:
        base.with_overrides(["policy.lora.rank=4"])
    assert not str(caught.value).startswith("policy.lora.rank:")
    trial = base.with_overrides(["policy.kind=full", "policy.lora.rank=4"])
    assert trial.policy.lora.rank == 8
    assert base.with_overrides(["policy.kind=lora", "policy.lora.rank=4"]).policy.lora.rank == 4
