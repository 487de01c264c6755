"""Model families: each family is one implementation of :class:`workers.models.family.ModelFamily`."""
