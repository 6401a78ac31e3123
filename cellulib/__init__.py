"""cellulib: breast tumour cellularity from H&E patches (Rakhlin et al., 2019), the library behind
the Cellularity Book."""

import warnings

__version__ = "0.1.0"

# albumentations imports huggingface_hub, which imports tqdm.auto; in a notebook without ipywidgets
# that warns "IProgress not found" on every chapter page. cellulib's own bars use plain tqdm/fastai.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

from cellulib.inference.modelfile import load_model, save_model  # noqa: E402  (torch is imported only when called)

__all__ = ["__version__", "load_model", "save_model"]
