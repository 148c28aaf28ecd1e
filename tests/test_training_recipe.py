"""Recipe owns its value ranges: out-of-range values are refused where the recipe is built, naming the field."""
import pytest

from cgf_fhe.errors import UserError
from cgf_fhe.training.recipes import RANGES, Recipe, RecipeError, get_recipe


@pytest.mark.parametrize("field, bad, good", [
    ("epochs", 0, 1), ("lr", -1e-5, 0.0), ("batch_size", 0, 1), ("max_length", 0, 8),
    ("layer_lr_decay", 0.0, 1.0), ("layer_lr_decay", 1.5, 0.5), ("select_holdout", 1.0, 0.0),
    ("evals_per_epoch", 0, 3), ("warmup_ratio", 1.5, 1.0), ("kd_temperature", 0.0, 2.0),
    ("kd_attn_weight", -1.0, 0.0), ("coeff_lr", -0.1, 0.0), ("softmax_blend_epochs", -1.0, 0.0),
    ("poly_dropout", 1.0, 0.1), ("reinit_layers", -1, 0),
])
def test_recipe_refuses_out_of_range_values(field, bad, good):
    with pytest.raises(RecipeError, match=f"^{field} must be") as info:
        get_recipe("reference", **{field: bad})
    assert info.value.field == field and isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert getattr(Recipe().override(**{field: good}), field) == good


def test_every_range_names_a_recipe_field_and_the_presets_pass():
    assert set(RANGES) <= set(Recipe.__dataclass_fields__)
    for preset in ("reference", "minilm"):
        get_recipe(preset)
    assert Recipe.from_dict(Recipe().to_dict()) == Recipe()
