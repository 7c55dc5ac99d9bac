"""User-facing media: frames in and out (``video``), face windows (``face``) and synthetic talking-head
clips (``synthetic``). Every frame handed out is a (H,W,3) uint8 RGB NumPy array."""
