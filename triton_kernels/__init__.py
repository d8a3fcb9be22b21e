"""Triton kernels, one module per family; installed as fastcore_ai.triton_kernels.

Imported lazily by fastcore_ai.ops (only when the triton backend runs), so `import fastcore_ai`
never imports triton. INTERPRETED records whether triton runs on its CPU interpreter: that is fixed
when triton is imported (TRITON_INTERPRET=1 must be set before), so the backend check reads it here.
"""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
