"""Every key spatia writes into a SpatialData / AnnData object is spelled out here, and only here."""

from __future__ import annotations


class Keys:
    """Result and input keys (``obsm``, ``layers``, ``obs``, ``uns``, element names)."""

    # embeddings (table.obsm)
    CELL_EMB = "X_spatia_cell"
    NICHE_EMB = "X_spatia_niche"
    TISSUE_EMB = "X_spatia_tissue"
    LEVEL_TO_EMB = {"cell": CELL_EMB, "niche": NICHE_EMB, "tissue": TISSUE_EMB}

    # expression (table.layers / new tables)
    IMPUTED = "spatia_imputed"
    PREDICTED = "spatia_predicted"

    # labels and clusters (table.obs)
    CELL_TYPE = "spatia_cell_type"
    CELL_TYPE_CONF = "spatia_cell_type_confidence"
    CELL_TYPE_PROBA = "spatia_cell_type_proba"  # obsm
    NICHE = "spatia_niche"
    CLUSTER = "spatia_cluster"
    TILE = "spatia_tile"

    # graphs (table.obsp)
    NICHE_GRAPH = "spatia_niche"  # -> obsp["spatia_niche_connectivities"], obsp["spatia_niche_distances"]

    # generated images
    GENERATED = "spatia_generated"
    TRANSITION = "spatia_transition"
    PAIR = "spatia_pair"  # -> obs["spatia_pair_match"], ["spatia_pair_confidence"], ["spatia_pair_shift_pvalue"]
    TRANSITIONS = "transitions"  # uns["spatia"]["transitions"][f"{source}->{target}"]

    # run parameters (table.uns)
    UNS = "spatia"

    # inputs / conventions
    SPATIAL = "spatial"  # obsm key of cell centroids (in the table's coordinate system, usually µm)
    UM_PER_UNIT = "spatia_um_per_unit"  # sdata.attrs[...][coordinate_system] / adata.uns[...]: µm per unit
    UNITS = "units"  # uns["spatia"][...]["units"]: {"um_per_unit", "source", "coordinate_system"}

    # ground truth written by the simulator (table.obs / uns)
    SIM_UNS = "simulation"


class Defaults:
    """Default parameters shared by several functions."""

    TABLE = "table"
    COORDINATE_SYSTEM = "global"
    CROP_SIZE = 32  # pixels of the model input
    CROP_UM = 16.0  # side of the crop in µm when fixed
    NICHE_K = 10
    TILE_UM = 200.0
    SHIFT_NEIGHBORS = 60  # cells per neighbourhood of the morphology-shift test (PairResult.shift_test)
    SHIFT_ALPHA = 0.01  # sp.tl.transition transforms the cells whose shift test is significant at this level
    PAIR_NEIGHBORS = 15  # pair_states(marginals="composition"): kNN graph of the source clusters, target votes
