"""Ensembles: the combination rules on hand-made probabilities, then tiny trained runs (different
backbones and tokenizers, a tiny sweep), the saved artefact, ``finetune predict``, bad input, and one
check on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, SHARED_DATA, tiny_recipe

from finetune import RecipeError
from finetune.cli import main
from finetune.ensemble import (
    Ensemble,
    Pool,
    average,
    is_ensemble,
    load_members,
    vote,
    vote_shares,
)
from finetune.predict import load_run, predict

TEXTS = ["a great film", "the plot was dull and boring", "it was fine", "awful actor , superb story"]


# --- combination rules -------------------------------------------------------------------


def test_mean_and_weighted_mean_are_weighted_sums_of_probabilities():
    probs = torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]])  # (members, inputs, labels)
    assert torch.allclose(average(probs, torch.tensor([0.5, 0.5])), torch.tensor([[0.6, 0.4]]))
    assert torch.allclose(average(probs, torch.tensor([0.25, 0.75])), torch.tensor([[0.45, 0.55]]))


def test_vote_takes_the_majority_even_against_the_mean():
    probs = torch.tensor([[[0.45, 0.55]], [[0.4, 0.6]], [[0.99, 0.01]]])  # mean favours 0, two votes for 1
    weights = torch.full((3,), 1 / 3)
    assert average(probs, weights).argmax(-1).item() == 0
    assert vote(probs, weights).item() == 1
    assert vote_shares(probs, weights).tolist()[0] == pytest.approx([1 / 3, 2 / 3])


def test_vote_ties_go_to_the_larger_summed_probability_then_the_lowest_label():
    """Documented tie-break: summed probability among the tied labels, then the lowest label id;
    the answer doesn't change with member order."""
    by_probability = torch.tensor([[[0.6, 0.4, 0.0]], [[0.1, 0.5, 0.4]], [[0.2, 0.3, 0.5]], [[0.3, 0.0, 0.7]]])
    # votes: 0, 1, 2, 2 -> no tie, label 2
    assert vote(by_probability, torch.full((4,), 0.25)).item() == 2
    tie = torch.tensor([[[0.6, 0.4, 0.0]], [[0.2, 0.7, 0.1]]])  # one vote each for 0 and 1; sums 0.8 vs 1.1
    for order in ([0, 1], [1, 0]):
        assert vote(tie[order], torch.full((2,), 0.5)).item() == 1
    exact = torch.tensor([[[0.7, 0.3, 0.0]], [[0.3, 0.7, 0.0]]])  # tied votes and tied sums: lowest id
    for order in ([0, 1], [1, 0]):
        assert vote(exact[order], torch.full((2,), 0.5)).item() == 0
    untied_third = torch.tensor([[[0.5, 0.0, 0.5]], [[0.0, 0.5, 0.5]]])  # argmax picks 0 and 1; 2 has no vote
    assert vote(untied_third, torch.full((2,), 0.5)).item() == 0


# --- trained members -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_backbone(tmp_path_factory):
    """A different architecture size and tokenizer: 48 wide, one layer, a 30-entry vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("other-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *sorted(set(POSITIVE + NEGATIVE + FILLER))]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, model_max_length=64)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_backbone, other_backbone, sentiment_dir, tmp_path_factory):
    """good: learns the task; weak: two steps; other: another backbone, tokenizer and max_length."""
    out = tmp_path_factory.mktemp("ensemble-runs")
    good = tiny_recipe(tiny_backbone, sentiment_dir, out / "good", train={"epochs": 3}).run().run_dir
    weak = tiny_recipe(tiny_backbone, sentiment_dir, out / "weak",
                       train={"max_steps": 2, "eval_every": 2, "lr": 1e-3, "seed": 3}).run().run_dir
    other = tiny_recipe(other_backbone, sentiment_dir, out / "other", train={"epochs": 3},
                        data={"path": str(sentiment_dir), "columns": {"text": "sentence"}, "max_length": 16}).run().run_dir
    return {"good": good, "weak": weak, "other": other}


def pool_of(*paths) -> Pool:
    members = load_members(list(paths))
    return Pool(members, members[0].run.recipe)


def test_identical_members_equal_the_member(runs):
    """Two copies of one run, under every rule, predict exactly what the run predicts alone."""
    alone = predict(load_run(runs["good"]), TEXTS)
    members = load_members([runs["good"], runs["good"]])
    for method in ("mean", "weighted", "vote"):
        together = Ensemble(members, [0.5, 0.5], method, members[0].run.recipe).predict(TEXTS)
        for one, both in zip(alone, together):
            assert both["label"] == one["label"]
            assert both["probabilities"] == pytest.approx(one["probabilities"], abs=1e-5)
    pool = pool_of(runs["good"], runs["good"])
    assert torch.equal(pool.outputs["validation"][0], pool.outputs["validation"][1])
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert pool.scores(half, "mean", "test") == pytest.approx(pool.member_scores("test")[0])


def test_weighted_mean_uses_normalised_validation_scores(runs):
    pool = pool_of(runs["good"], runs["weak"])
    accuracies = [m["accuracy"] for m in pool.member_scores("validation")]
    weights = pool.validation_weights()
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights.tolist() == pytest.approx([a / sum(accuracies) for a in accuracies])


def test_greedy_selection_is_at_least_as_good_as_the_best_member_on_validation(runs):
    pool = pool_of(runs["weak"], runs["good"], runs["other"])
    best_single = max(m["accuracy"] for m in pool.member_scores("validation"))
    weights, trace = pool.greedy("mean", steps=3)
    assert len(trace) == 3 and weights.sum().item() == pytest.approx(1.0)
    assert pool.scores(weights, "mean", "validation")["accuracy"] >= best_single
    assert trace[0]["validation"]["accuracy"] == best_single  # the first pick is the best single member
    # weights are picks / bag size, for a bag of at most 3 picks
    assert any(all(abs(w * k - round(w * k)) < 1e-9 for w in weights.tolist()) for k in (1, 2, 3))


def test_a_deadline_scores_the_first_member_and_leaves_out_what_would_pass_it(runs):
    members = load_members([runs["good"], runs["weak"], runs["other"]])
    late = Pool(members, members[0].run.recipe, deadline=time.monotonic() - 1)
    assert [m.name for m in late.members] == [members[0].name] and late.outputs["test"].shape[0] == 1
    assert late.left_out == [members[1].name, members[2].name]
    roomy = Pool(members, members[0].run.recipe, deadline=time.monotonic() + 3600)
    assert len(roomy.members) == 3 and roomy.left_out == []
    assert torch.equal(roomy.outputs["test"][0], late.outputs["test"][0])


def test_members_with_different_backbones_and_tokenizers_combine(runs):
    """Each member tokenises with its own tokenizer (vocabularies of 30522 and 30 entries) and max_length."""
    pool = pool_of(runs["good"], runs["other"])
    assert [m.run.tokenizer.vocab_size for m in pool.members] == [30522, 30]
    assert [m.run.recipe.data.max_length for m in pool.members] == [32, 16]
    assert min(m["accuracy"] for m in pool.member_scores("test")) > 0.8  # both learnt the task
    single = [predict(m.run, TEXTS) for m in pool.members]
    ensemble = Ensemble(pool.members, [0.5, 0.5], "mean", pool.recipe).predict(TEXTS)
    for i, result in enumerate(ensemble):
        for label in ("0", "1"):
            expected = (single[0][i]["probabilities"][label] + single[1][i]["probabilities"][label]) / 2
            assert result["probabilities"][label] == pytest.approx(expected, abs=1e-5)
    report = pool.report(torch.tensor([0.5, 0.5], dtype=torch.float64), "mean")
    assert set(report["ensemble"]) == {"validation", "test"} and report["rows"] == {"validation": 64, "test": 64}


def test_labels_are_matched_by_name_and_other_label_sets_are_refused(runs, tmp_path):
    """A member whose label ids are swapped is read by label name; a member with other labels is an error."""
    swapped = tmp_path / "swapped"
    shutil.copytree(runs["good"], swapped)
    (swapped / "label_map.json").write_text(json.dumps({"0": "1", "1": "0"}))
    members = load_members([runs["good"], swapped])
    for result in Ensemble(members, [0.5, 0.5], "mean", members[0].run.recipe).predict(TEXTS):
        assert result["probabilities"]["0"] == pytest.approx(0.5, abs=1e-5)  # p and 1 - p, averaged
    renamed = tmp_path / "renamed"
    shutil.copytree(runs["good"], renamed)
    (renamed / "label_map.json").write_text(json.dumps({"0": "neg", "1": "pos"}))
    mismatched = load_members([runs["good"], renamed])
    with pytest.raises(RecipeError, match=r"different label sets: run has \['0', '1'\], renamed has \['neg', 'pos'\]"):
        Ensemble(mismatched, [0.5, 0.5], "mean", mismatched[0].run.recipe)


# --- the command and the artefact -----------------------------------------------------------------


def test_command_saves_an_artefact_that_loads_and_predicts_like_the_in_memory_ensemble(runs, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", "--models", str(runs["good"]), str(runs["other"]), "--combine", "vote",
                 "--output", str(out), "data.max_test_samples=40"]) == 0
    table = capsys.readouterr().out
    assert "ensemble: vote" in table and "test accuracy" in table
    assert is_ensemble(out)
    saved = json.loads((out / "ensemble.json").read_text())
    assert saved["combine"] == "vote" and saved["labels"] == ["0", "1"]
    assert [m["weight"] for m in saved["members"]] == [0.5, 0.5]
    assert not saved["members"][0]["path"].startswith("/")  # relative to the ensemble folder
    assert saved["report"]["rows"] == {"validation": 64, "test": 40}
    assert json.loads((out / "ensemble_report.json").read_text()) == saved["report"]
    assert (out / "ensemble_report.md").read_text().count("|\n") >= 4
    loaded = Ensemble.load(out)
    members = load_members([runs["good"], runs["other"]])
    in_memory = Ensemble(members, [0.5, 0.5], "vote", members[0].run.recipe).predict(TEXTS)
    assert loaded.predict(TEXTS) == in_memory
    assert all("votes" in r for r in in_memory)
    # finetune predict takes the ensemble folder like a run folder
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", "--model", str(out), "--input", str(inputs)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["input"] for line in lines] == TEXTS
    assert [line["label"] for line in lines] == [r["label"] for r in in_memory]


def test_greedy_command_and_copied_members(runs, tmp_path, capsys):
    out = tmp_path / "greedy"
    assert main(["ensemble", "--models", str(runs["weak"]), str(runs["good"]), "--greedy", "--copy-members",
                 "--output", str(out)]) == 0
    saved = json.loads((out / "ensemble.json").read_text())
    assert saved["report"]["greedy"] and len(saved["report"]["selection"]) == 2
    assert all(m["path"].startswith("members/") for m in saved["members"])
    moved = tmp_path / "moved"
    shutil.move(out, moved)  # the copies travel with the folder
    assert Ensemble.load(moved).predict(TEXTS[:1])[0]["label"] in ("0", "1")
    assert main(["ensemble", "--models", str(runs["good"]), "--output", str(moved)]) == 2
    assert "already holds an ensemble; pass --overwrite" in capsys.readouterr().err


def test_from_sweep_takes_the_top_k_by_objective_and_says_when_models_were_removed(tiny_backbone, sentiment_dir,
                                                                                  tmp_path, capsys):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1, "eval_every": 3, "batch_size": 32})
    result = recipe.sweep({"train.lr": [1e-7, 3e-3, 1e-2]}, method="grid", keep_top_k=2, dir=str(tmp_path / "sweep"))
    ranked = sorted(result.trials, key=lambda r: (-r["value"], r["number"]))
    capsys.readouterr()
    out = tmp_path / "from-sweep"
    assert main(["ensemble", "--from-sweep", str(result.sweep_dir), "--top-k", "3", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"trials [{ranked[2]['number']}] had their models removed" in err
    saved = json.loads((out / "ensemble.json").read_text())
    assert [m["name"] for m in saved["members"]] == [f"trial {r['number']}" for r in ranked[:2]]
    assert main(["ensemble", "--from-sweep", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "has no sweep.yaml and report/trials.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--models", "MISSING"], "--models: member MISSING does not exist"),
    (["--models", "GOOD", "--combine", "weighted", "--greedy"], "--greedy sets the weights itself"),
    (["--models", "GOOD", "--top-k", "2"], "--models are all used"),
    (["--models", "GOOD", "train.lr=1"], "not 'train.lr=1'"),
])
def test_bad_command_lines_exit_2_with_the_flag_named(runs, tmp_path, capsys, argv, message):
    argv = [str(runs["good"]) if a == "GOOD" else str(tmp_path / a) if a == "MISSING" else a for a in argv]
    assert main(["ensemble", *argv, "--output", str(tmp_path / "out")]) == 2
    assert message.replace("MISSING", str(tmp_path / "MISSING")) in capsys.readouterr().err


def test_a_missing_member_or_changed_labels_fail_at_load_with_exit_2(runs, tmp_path, capsys):
    member = tmp_path / "member"
    shutil.copytree(runs["good"], member)
    out = tmp_path / "ens"
    assert main(["ensemble", "--models", str(runs["good"]), str(member), "--output", str(out)]) == 0
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a great film\n")
    (member / "label_map.json").write_text(json.dumps({"0": "neg", "1": "pos"}))
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(inputs)]) == 2
    assert "different label sets" in capsys.readouterr().err
    shutil.rmtree(member)
    assert main(["predict", "--model", str(out), "--input", str(inputs)]) == 2
    assert "member member is missing" in capsys.readouterr().err


def test_regression_members_average_scores_and_refuse_to_vote(tiny_backbone, regression_dir, tmp_path, capsys):
    run = tiny_recipe(tiny_backbone, regression_dir, tmp_path, task="regression",
                      data={"path": str(regression_dir), "columns": {"text": "text", "label": "score"}, "max_length": 32},
                      eval={"metrics": ["pearson"], "primary": "pearson"}, train={"max_steps": 4, "eval_every": 4}
                      ).run().run_dir
    members = load_members([run, run])
    alone = predict(members[0].run, TEXTS)
    together = Ensemble(members, [0.5, 0.5], "mean", members[0].run.recipe).predict(TEXTS)
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-5)
    assert main(["ensemble", "--models", str(run), str(run), "--combine", "vote", "--output", str(tmp_path / "e")]) == 2
    assert "vote does not apply to regression" in capsys.readouterr().err


# --- the real backbone -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_ensemble_of_a_probe_and_a_lora_run(tmp_path):
    """all-MiniLM-L6-v2 on SST-2: a linear probe (300 sentences) and a briefly trained LoRA run, ensembled
    by greedy selection on 200 validation sentences and scored on 200 test sentences. Each member scores
    as it did at the end of its training, the artefact reloads, and the merged LoRA weights the ensemble
    uses predict what the peft adapter predicts."""
    import recipes

    assert (SHARED_DATA / "sst2" / "test.tsv").is_file(), "SST-2 is expected in ../shared/data"
    quick = ["data.max_train_samples=300", "data.max_eval_samples=200", "data.max_test_samples=200",
             "train.eval_every=epoch"]
    probe = recipes.sst2_minilm_head(*quick, "train.epochs=6", "train.lr=1e-2", f"output.dir={tmp_path / 'probe'}").run()
    lora = recipes.sst2_minilm_lora(*quick, "train.max_steps=6", "train.batch_size=16",
                                    f"output.dir={tmp_path / 'lora'}").run()
    out = tmp_path / "ens"
    assert main(["ensemble", "--models", str(probe.run_dir), str(lora.run_dir), "--greedy", "--output", str(out)]) == 0
    report = json.loads((out / "ensemble_report.json").read_text())
    assert report["rows"] == {"validation": 200, "test": 200}
    for member, run in zip(report["members"], (probe, lora)):
        assert member["test"]["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"], abs=1 / 200)
    assert report["members"][0]["test"]["accuracy"] > 0.65
    best_member = max(m["validation"]["accuracy"] for m in report["members"])
    assert report["ensemble"]["validation"]["accuracy"] >= best_member
    sentences = ["a gripping , funny film", "the plot is dull and the jokes fall flat"]
    lora_member = load_members([lora.run_dir])
    merged = Ensemble(lora_member, [1.0], "mean", lora_member[0].run.recipe).predict(sentences)
    adapter = predict(load_run(lora.run_dir), sentences)  # peft, not merged
    for ours, theirs in zip(merged, adapter):
        assert ours["probabilities"]["positive"] == pytest.approx(theirs["probabilities"]["positive"], abs=1e-4)
    assert len(Ensemble.load(out).predict(sentences)) == 2
