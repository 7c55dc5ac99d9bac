"""Training for dagan_fast models: synthetic face clips (``synthetic``), datasets (``data``), losses
(``losses``), configurations (``configs``) and the keypoint + generator training loop (``train``:
``python -m training.train --config tiny``)."""
