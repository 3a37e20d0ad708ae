"""Write the quality prior ``edgekv plan`` uses for models with no weights at hand: the
demo model's probe (each layer's KL per format and its error shares by age), as
``kv_format="auto"`` measures it on a CPU (edgekv/auto/quality.py).

    python scripts/make_quality_prior.py        # rewrites edgekv/auto/prior_demo.json
"""

from __future__ import annotations

import json

from edgekv.auto.quality import PRIOR_FILE, measure_demo

if __name__ == "__main__":
    model = measure_demo()
    PRIOR_FILE.write_text(json.dumps(model.to_json(), separators=(",", ":")) + "\n")
    kl = {f: sum(r[j] for r in model.kl) for j, f in enumerate(model.formats)}
    print(f"wrote {PRIOR_FILE} ({model.num_layers} layers, {model.calibration_tokens} "
          f"calibration tokens); KL per format: "
          + ", ".join(f"{f} {k:.2e}" for f, k in kl.items()))
