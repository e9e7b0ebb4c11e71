"""Data sets: SynthScenes (embedded), Broden (concepts), validation sets (file lists, Places365, ImageFolder)."""
