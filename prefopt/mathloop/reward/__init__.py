"""The tiny reward model: its Bradley-Terry training (`bradley_terry`) and scoring with any reward model (`scorer`)."""
