"""Recipe schema: strict validation with lines and suggestions, round trip with HfPtqConfig."""
from pathlib import Path

import pytest
import yaml

import hfptq
from hfptq.recipes import Recipe, builtin_recipes_dir, find_recipe, load_recipe
from hfptq.errors import RecipeError

RECIPES = sorted(builtin_recipes_dir().glob("*.yaml"))


def test_builtin_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"default", "static-ffn", "w8a8-all-linear", "int8-weight-only", "int4-g128", "smollm2-135m",
            "bert-ag-news"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_builtin_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    config = recipe.to_config()
    again = load_recipe(Recipe.from_config(config, name=recipe.name).to_yaml())
    assert again.to_config().to_dict() == config.to_dict()


def test_recipe_config_recipe_round_trip():
    cfg = hfptq.HfPtqConfig(activations="static", rules=[{"targets": "down_proj", "precision": "fp16"}],
                            calibration={"dataset": "wikitext", "config": "wikitext-2-raw-v1", "num_samples": 8})
    recipe = Recipe.from_config(cfg, name="x")
    text = recipe.to_yaml()
    back = load_recipe(text)
    assert back.quantization == recipe.quantization
    assert back.to_config().to_dict() == cfg.to_dict()


def test_unknown_key_points_at_line_and_suggests(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nname: t\nquantization:\n  activations: dynamic\n  calibraton:\n    dataset: x\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:5" in msg and "calibraton" in msg and "Did you mean 'calibration'" in msg


def test_nested_typo_in_evaluation(tmp_path):
    text = "version: 1\nname: t\nevaluation:\n  perplexity:\n    seq_len: 128\n    strid: 64\n"
    with pytest.raises(RecipeError, match=r"<string>:6: unknown key evaluation.perplexity.strid. Did you mean 'stride'"):
        load_recipe(text)


def test_top_level_typo():
    with pytest.raises(RecipeError, match="Did you mean 'quantization'"):
        load_recipe("version: 1\nname: t\nquantisation: {}\n")


def test_wrong_type_and_bad_values():
    with pytest.raises(RecipeError, match="evaluation.perplexity.seq_len must be int"):
        load_recipe("version: 1\nname: t\nevaluation: {perplexity: {seq_len: long}}\n")
    with pytest.raises(RecipeError, match="model.task"):
        load_recipe("version: 1\nname: t\nmodel: {task: causal}\n")
    with pytest.raises(RecipeError, match="newer"):
        load_recipe("version: 99\nname: t\n")
    with pytest.raises(RecipeError, match="activations.mode='dynamc'.*Did you mean 'dynamic'"):
        load_recipe("version: 1\nname: t\nquantization: {activations: dynamc}\n")


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("version: 1\nname: [unclosed\n")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="Built-in recipes"):
        find_recipe("defualt")


def test_find_builtin_by_name():
    assert find_recipe("default") == builtin_recipes_dir() / "default.yaml"


def test_saved_recipe_is_plain_yaml(tmp_path):
    recipe = load_recipe(find_recipe("default"))
    out = recipe.save(tmp_path / "copy.yaml")
    data = yaml.safe_load(out.read_text())
    assert data["quantization"]["activations"] == "dynamic"
    assert data["quantization"]["rules"][0]["activations"] == {"mode": "dynamic", "rotation": 128}
    assert load_recipe(out).to_config().to_dict() == recipe.to_config().to_dict()
