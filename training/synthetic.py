"""The synthetic talking-head clips training uses: ``dagan_fast.synthetic`` (it ships with the package because
``dagan-fast demo`` drives its portrait with them)."""
from dagan_fast.synthetic import *  # noqa: F401,F403
