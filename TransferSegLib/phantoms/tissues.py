"""The tissue classes a CT phantom is painted with, and their names (``ct_phantom(..., with_tissues=True)``)."""

# Tissue classes painted on the fine grid; each gets an HU value and texture amplitudes.
(AIR, SKIN, FAT_SC, MUSCLE, FAT_VISC, LUNG, LIVER, LIVER_PORTAL, LIVER_HEPATIC, SPLEEN,
 KIDNEY_CORTEX, KIDNEY_MEDULLA, RENAL_SINUS, AORTA, VEIN, PORTAL, BONE_CORTEX, BONE_MARROW,
 DISC, CSF, CARTILAGE, BOWEL_WALL, FLUID, GAS, STOOL, BILE, MYOCARDIUM, BLOOD, PANCREAS,
 TABLE_SHELL, TABLE_FOAM, GREY_MATTER, WHITE_MATTER, THYROID, TRACHEA, URINE) = range(36)
TUMOR0 = 64  # tumor n is class TUMOR0 + n
RIM0 = 128   # the enhancing rim or capsule of tumor n is class RIM0 + n (labelled tumor too)
HALO0 = 192  # the fading outer margin of tumor n is class HALO0 + n (labelled tumor too)
LIVER_TISSUE = (LIVER, LIVER_PORTAL, LIVER_HEPATIC)
#: Names of the values in the tissue map that ``ct_phantom(..., with_tissues=True)`` returns.
CT_TISSUE_NAMES = {
    AIR: "air", SKIN: "skin", FAT_SC: "subcutaneous fat", MUSCLE: "muscle", FAT_VISC: "visceral fat",
    LUNG: "lung", LIVER: "liver", LIVER_PORTAL: "portal vein branch (in liver)",
    LIVER_HEPATIC: "hepatic vein (in liver)", SPLEEN: "spleen", KIDNEY_CORTEX: "kidney cortex",
    KIDNEY_MEDULLA: "kidney medulla", RENAL_SINUS: "renal sinus fat", AORTA: "aorta",
    VEIN: "inferior vena cava / renal vein", PORTAL: "portal vein", BONE_CORTEX: "cortical bone",
    BONE_MARROW: "cancellous bone", DISC: "intervertebral disc", CSF: "spinal canal", CARTILAGE: "costal cartilage",
    BOWEL_WALL: "bowel / stomach wall", FLUID: "bowel / stomach fluid", GAS: "bowel / stomach gas",
    STOOL: "stool", BILE: "gallbladder", MYOCARDIUM: "myocardium", BLOOD: "heart blood pool",
    PANCREAS: "pancreas", TABLE_SHELL: "table shell", TABLE_FOAM: "table foam", GREY_MATTER: "grey matter",
    WHITE_MATTER: "white matter", THYROID: "thyroid", TRACHEA: "trachea", URINE: "urine (bladder)",
    TUMOR0: "liver tumor",
}
