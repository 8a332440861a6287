"""IBM Granite 3: Llama layout with embedding/residual/attention multipliers and logit scaling."""
from . import Family

FAMILY = Family(name="granite", model_types=("granite",))
