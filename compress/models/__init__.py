"""The user's model and data: a MODEL argument turned into a torch module (factory file or module, Hugging Face
folder, weights), and its inputs (--input-shape, --calib .npz read lazily) keyed by forward() names.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "inputs": ["Prepared", "calib_samples", "check_calib_names", "example_inputs", "load_calib", "npz_keys",
               "prepare_inputs"],
    "shapes": ["parse_input_shape", "require_one_input_source", "shape_args"],
    "loading": ["LoadedModel", "load_model", "load_option_function"],
    "data_inputs": ["load_onnx_model", "load_run_model", "model_inputs"],
    "onnx_inputs": ["onnx_model_inputs"],
})
