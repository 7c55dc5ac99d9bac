"""User-facing media: frames in and out (``video``), face windows and driving-face tracking (``face``),
pasting results back into the full-resolution source (``paste_back``), sound and output codecs (``audio``),
the live camera loop and virtual camera (``webcam``) and synthetic talking-head clips (``synthetic``).
Every frame handed out is a (H,W,3) uint8 RGB NumPy array."""
