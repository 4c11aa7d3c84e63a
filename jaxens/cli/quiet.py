"""Quiet by default: the ``jaxens`` command hides third-party notices a user cannot act on.

:func:`quiet_third_party` runs first in :func:`jaxens.cli.main`, before anything imports
``transformers`` or ``tokenizers``.  It only sets defaults, so a variable or ``-W`` option the
user gave wins:

* ``TRANSFORMERS_NO_ADVISORY_WARNINGS=1`` and ``TRANSFORMERS_VERBOSITY=error``: no
  "PyTorch was not found. Models won't be available ..." (jaxens never needs PyTorch) and no
  other transformers advice;
* ``TOKENIZERS_PARALLELISM=false``: no "The current process just got forked ..." when the zoo
  runs ``pip download`` after a tokenizer was used (tokenizing is not the hot path);
* Python warnings attributed to modules outside ``jaxens`` are ignored (unless ``-W`` or
  ``PYTHONWARNINGS`` is given); jaxens's own warnings, and anything raised at a jaxens line,
  are still shown.

Errors are never hidden, and jax's own notices that say what to install (a GPU without a
CUDA jaxlib: ``pip install 'jaxens[cuda]'``) stay.
"""

from __future__ import annotations

import os
import sys
import warnings

ENV_DEFAULTS = {
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_third_party() -> None:
    """Set the :data:`ENV_DEFAULTS` (where unset) and ignore non-jaxens Python warnings.

    Example::

        quiet_third_party()        # then: import transformers  -> no advisory notice
    """
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if "transformers" in sys.modules:  # imported already (a library user, a test): its logger too
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", module=r"(?!jaxens(\.|$))")
