"""The synthetic talking-head clips training uses: ``dagan_fast.media.synthetic`` (it ships with the package because
``dagan-fast demo`` drives its portrait with them)."""
from dagan_fast.media.synthetic import *  # noqa: F401,F403
