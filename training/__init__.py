"""Training for dagan_fast models: synthetic face clips (``synthetic``, re-exported from ``dagan_fast.media.synthetic``),
datasets (``data``), losses (``losses``), configurations (``configs``), self-supervised face depth with
uncertainty (``depth`` + ``train_depth``: ``python -m training.train_depth --config depth_tiny``), the keypoint +
generator training loop for DaGAN and DaGAN++ (``train``: ``python -m training.train --config tiny``), metrics and
held-out evaluation (``metrics`` + ``evaluate``) and ``release`` (a training run -> a user model file)."""
