"""Real annotated images for training the bundled model's SAM, disjoint from the benchmark's catalog.

The benchmark (``catalog.py``) scores tune and report images; nothing here is one of them, and nothing
here is a neighbour of a report image in the same volume:

* **H&E, glioblastoma (GBM40)**: 40 tiles of 512 x 512 with manual nucleus contours (Kong et al., ISBI 2016;
  Zhang et al., ISBI 2017), from ``pengyzhang/cell_seg_matlab``; the catalog's H&E images are CPM-15
  tiles from another folder of that repository.
* **TEM, ISBI 2012**: training slices 1-4, 16-19 and 21-29 of the 30 (``zhixuhao/unet``); slices 5-15 are
  left out because the catalog's report slice is 10 (the catalog's tune slices 0 and 20 are left out too).
* **Phase contrast, bacteria**: the seven test images of ``kevinjohncutler/omnipose`` with their masks
  (Cutler et al., Nat. Methods 19, 2022).
* **Ki67 IHC and DAPI fluorescence (DeepLIIF)**: the two validation files of ``nadeemlab/DeepLIIF``
  (bladder, lung; the IHC panel and the registered DAPI panel, with the manual nuclei of the mask panel);
  the catalog's IHC images are that repository's four test tiles.
* **Brightfield, live adherent cells**: 28 colour camera images of 256 x 256 (two of each of the 14
  numbered series) with manual binary cell masks, from ``anonymusUID/DL_BrightField`` (``ITMO/01_BRIGHT_FIELD``;
  touching cells share one mask component, so these images train modality and description questions
  more than counts); the catalog has no brightfield image.
* **Electron microscopy, myelinated axons**: the "subject 1" image of ``axondeepseg/data-testing`` with
  its axon mask (Zaimi et al., Sci. Rep. 8, 2018); the catalog's two axon images are other files.

Each file is pinned by commit and SHA-256 and fetched as ``catalog.py`` fetches (a folder of bare git
mirrors, or raw.githubusercontent.com). Used by ``scripts/train_real_sam.py``; licences as in
``SOURCES.md`` (research use with citation; nothing is redistributed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import catalog as _catalog  # noqa: E402  (benchmarks/ is not a package)
from catalog import CATALOG, CatalogError, Entry, RawFile  # noqa: E402

MAX_POLYGONS = 5000  # per annotation file
MAX_XML_BYTES = 8 << 20

# SHA-256 of (image, annotation) per file, computed from the pinned commits below.
GBM = {
    1: ("1d0f2f9c6bdffba29110de2ac765d7528abca4f5422a4919778505cdc24079d1", "3668b8d259adacb7c63d4a5ade3895fe549d8f9e68d308b23f30be4afa988c05"),
    2: ("9e224d25ec72c26d8d0f1c67eb45ba9bb718f62bee6e89b82a3db79be3715dda", "3dd877b4de182c8f74368e1390bd3d660b80b975f3cdd822833ee8789e44a34b"),
    3: ("de8e9af50c0704152711960001db2f21ff8c88a147cae12e050e16a51ab3c5d4", "a930e70240b1661eeb01d88a72c5a388e13cc12a7128b2b7a57e6bd9396f6b08"),
    4: ("11caf99e228c4f9ece37a53f722aa423b6ba47f30e8ea2f5b9c3778bbf089eaa", "c558a0746eda9ad6e4a0cbdab76ce553ac81c4245b451cf81bb6efdb5dcfece8"),
    5: ("8cd127d08b04973c309165d994a77e05e0f50b1b9bc156406d278d8c2137e4c4", "498b12589b39471ff5321d2e097b012171367f05f911aa5976c97cead1fcb93b"),
    6: ("1f62c4647e03b33fd25c320ad75060f8e779935e83635921aa9679207a5e0625", "1a1bee49180f6b5fc26adcca7a6da312e9261034af5b39ecf5f9aaf0312eeaef"),
    7: ("6d9cce977ef6df5d9f0cc223d0d9b13e5fd5d3d11c2303f5062d0c7c915a8760", "06a468bb1a4eb6bde00930adfd08c41a4329e8c87f11779cec0c9b36b1849200"),
    8: ("616d410806c3e8cf455e14b0e0037cb6f883936ac82248acbb9e9d1b9e7745a7", "b0a4e05310a10eb4d89be9b001baca1cc328842a04d64208f4abca85d8f1aecc"),
    9: ("6b32a67f5036b628481e415e7acc380684167ac9d2b16a6e2fbaf09242a58efc", "6ff0d807a041af6bd9bda609dd38e00b460e5d881ca55e73c22db928bbda1614"),
    10: ("0af58534eec55f1e524f4384fe7d38639f6c6e8eb70dc9d35309cd4b02e63727", "b064625b205f0359cbe6b1eb3fe1e301210683079b3d9d97a4559295b288d9dd"),
    11: ("579c27911b66ab1aa3228659d50c04c9e0e13ecd0de39ab9844bdd65b1945cc4", "71e1dc83f35fdf727745262a3f3ccda184b1544850641044156ac0d220d74b51"),
    12: ("11668945e8a5b786595c87c1276e69b16086eefc105ae3b7684b8c69e6313037", "5910dca2162b417fd47c459334e5c56f67312fccf94593a36d67d0334eb17390"),
    13: ("f92b14faff0813d7fd6c554bddbf43ccf906bcc7b6193e5ddeda47fa8b0ef4aa", "1844eae1bd62888bfe9d75df1a9e68e1bee5f5b8d08e74383684e843bd8ba0a2"),
    14: ("9720b20cd00c0ffbc56b7d241dfb5d56e6deca8518cfa4d9c42e4ac96c3e03eb", "3143b370848a0047de59df5c21b54c61714c646ecf0c036494c6d909ba2c3d4e"),
    15: ("96bd54fac626c4d2f3d7cfc90132b0d79b23720e75ab2620d75ab1c2c2b208a9", "ad2c60ea869483f1a0a61138dec3b676e94a084b4c09a57e62e7d065c2957283"),
    16: ("8b703579cb40fe7c2149cf2ab6152174ac8b3241f0cb26aa3a984d86c8406530", "2474973f1ef2f20340ca42bbc056d1b89e28063c0f805eeaeecac86af695af72"),
    17: ("0b0d233a53224fc72e49e05fe0873922eee1ea2eb45aaaac729064e2c0aea41c", "d17d530902382309f0bc4a819e4f0804c850355df47d11c0625e30c0204ae8bd"),
    18: ("e42e1660b67523923a5949c7b95a92103a5a65d6de018ee81345cb4a3e8b045b", "f73b3d2dcf1b7380e5c3df6f1efc05d7d00c06c15609440ebcafaff5911d4c06"),
    19: ("8bc6554006aee6d9889e8558d1fa31f3256f9f07054f38d7484b02d765bc686d", "759cb728d6d214550e9017268a3edd16481970815da1de26579d9fc19aafd074"),
    20: ("b90d2652cf55f06f953d1528f4e747e0b543a3429a70c6fd1dcc770d345a7992", "4891a12d93671e98172106b50733fe9c67d1a6b7e1a3afb6bbc974ffeaf1c2dc"),
    21: ("d24aa57b9ce3c311fb5b5d983f5436ac01126cf099b25b105a0780722bdf122e", "6c5a1199ff0a7effe1d8b9b5594f14fb6072cb873b11b2a24a3243e429a59e34"),
    22: ("d460dc58380176535725acf60e9b6a42bf78dc97e3e6c3bfdd9b6472a9485e8f", "93fa3f436c729ac399a7969d2da5d415d9379defd7a53313d2d076371ac7e4b4"),
    23: ("9a4a989c641772c2b537b60b16f0ef9fb7e896ff1c033275c94adeb749a2c4df", "04d32863b6c58e9e78e9ba711d595668e7e1128e9cbbe0a0f6587a5acc18160b"),
    24: ("92f312d06e612a7084bf6d0098096324d85a348c131dfd51bd0ac5f43211f924", "05b598fd52a567701e59bd9ab729ec7fc1fad807f17eb05042d93635480a1035"),
    25: ("3fcb0e5c8b7064cc9f0ddbea323ab686fb5b0beb08f55d85fb1c8750e8393a2c", "0ceea2fa1e6d6f4b605604cb400ed0d0fb8ecccb05763b74c24298d3204f52a3"),
    26: ("8117a316e582f1e3c2675f986b5b10b8def9c05a0188a7aaf6b681ffccdc97d5", "19bd6b0c63f00ae9e7b86ed1677c570a833bda7b2f7efa1856c2a124b5039bdd"),
    27: ("efcf62de34de6c48cace55d250a92b6c3e30483f0395743f619092004abb15a7", "5ebdcbbeaf7d6899d44fd38eae9f728688076d11786915805afd3e619fdc72b7"),
    28: ("951e05b4f2a1b946af2b3dbb0fab189cec02405a1db253a64119db80429b4a5f", "f87abcc890a468ddc7016df05524570bc0aeec32e8dc47190fdf7e40dfcf76da"),
    29: ("0adb5efb691253d2989978cf45b90253029cd52c424ef504972cf5867ddd7f8e", "d3229f8d0e60b85a51316f94791d51a2d461a3850d31a063376cf30978b1d523"),
    30: ("0e5d148d63f0410c36fbb7e92b9849a20e60f93e23b7b4b175e5108eb7340a3e", "5d247ce2d350ceb8ff0d8dbe3995b4fc9251747f9e7772d7d05e302467f5f013"),
    31: ("f6bd1703a1232316fe143bb2508f4ae59c4e76bab639f7eeb5ca9da82da20f6e", "d098fdfc554df770b501134dc2c12c4dc1a37621a71fa188618c340c2714bad8"),
    32: ("e8c7c32bcce4144da44ea6d55fcedd62edc81840f37ad6fa70723f328979b034", "c34bee7372835a6a70b50acee6f53f6b5dd937e2920e21fb4e34406663444682"),
    33: ("6d5db821d235068b33ca833f691e06bf33f1c9198af2dce8480b00a38cd0069a", "a664540e01dd8293c3f5895c04dd7e58dab174faa182afc3b0fb34c27d25f3eb"),
    34: ("8d31a2a7ced3d29c5c8c9a11344611e87e547a147606b9d3d623365f3ccd9169", "582b0dbfbf2380d7d8b2443c23889a3171fb4b9fa34c5d359b0e40ff7e8995d9"),
    35: ("f7fec15e926af14c42efdbebbad3f78d61266458443b76ac9140c217dd272a2d", "5d80a0c545d31eed4fca2d1bed6d86ab1a52fc9ddd15aae95ab2a38609dcb66b"),
    36: ("907865a79a45da641c69b58247336704cdf717872aae9249fe2e64f8554d297c", "825478686ebd25bcdfb575174bb8d693b081825e71a30b737a959a4c81645494"),
    37: ("3bb8240263395dc696ab191a2d7d29ae75e528aa86191766943bad88287aeacc", "5ff5e9b980ec03dbb98c66c8fa79ef81540eb3d61b0dc80254bbbf86f0add938"),
    38: ("ea2593d7af8e85dd8a22edcf08c0f322c1884efd6aaa3f78d5f2165112128ad8", "85fd5067744ee14a4182578175e90967d29ba66933bb98c505b9e1e97a39ba86"),
    39: ("518d1c7f45eb367b6a933f74a02a434ae386485cc8767cc3ac51cb826f5f6bab", "3394030f6544444423f52997b97ece220c5da98db636aebc471bfce77157d138"),
    40: ("fd9bc35063be0e60cb934d6a5a84e262d4e23cbb1faa98d617f6f7568b392274", "af7b3fae502bbc8f5bb081edb518ad2904c5ab0b58ad9aa531572736be59a1f6"),
}
ISBI = {
    1: ("2cfc7ee635a6f85d5faf5c82a71d3a37bf5af4784b554964e3e07193e3ee2166", "cff60a00de2901e67165c91d7708d784e4c5bcc9d1c8c677922c905d63bbc3d1"),
    2: ("fe60d8d4f93102666a23a18d718b4b59fab8e616987d11c5072f4a87fac7301f", "a578af998c017f56763b81941c4dc612dde5731809b2cea0e8ebc37aecb84dbb"),
    3: ("636d16cbb02f99dda4c9fb6db98dfba066142afa981ffdcfaf54453982e8250c", "c8ae3b843fed02e09411a24c10850160922c331041b17c2674025f05a99b8834"),
    4: ("991fb3a8e4abc73da1d6159ca28fa4397f0a8351f30a8ba3669c86414d2ce239", "a2f19c01b5d982a97923a0d29e64127a05e3f496731480ac9d9d302b5427f7ff"),
    16: ("ffc951c12450f94129582c16fd0d4b165c4a31469b0c42d966f07c183d3132e2", "b34eb88cdc3313a6f4190f5753465df7f69d8f3c243a5c25427b1b99ecfe2499"),
    17: ("0f4f7e8e0619e4c7d517ac68d3789a3b6248253747717eac418bb7d32bef4de3", "4fa076cbeb744803d987dc46cf308dc3026408e7a5188838e30e25fe3ea67dbe"),
    18: ("1bb1edd50595861743d14e1955dfa5d3c9395fb87563eca6dc81433bf9df49de", "bd009dda57f204804732f592ed1d41ba18961d83c492413fe71548efa4a288d9"),
    19: ("999b55633f8d7082add72082656e9532c5c3d97203b376eb317f09ba88a5a5b7", "bf38407c55b6033c1677230228ecb100a11294aa74a7b92e5edfdc4abadcfef9"),
    21: ("9ad07cf4f67984f17a08aa63e6d92d395ce55f5132e6ff4fa6d95d6890ea7f97", "772c722acb2eac01769b53fa5037a3d62745e53102398bf9b2202df605cadda4"),
    22: ("6278609b4c42a7cb43212de0e2e2ceded758bafe0856fb56214ce658a61668e4", "b19f5533ec24077a2395a085fe53af75dd350ef03798c4ff40ba9ebecb2ee0ad"),
    23: ("9ef4e9fbc838b9791af83a36918d729a0ea2e90ebc71c4a3c4554059f9379756", "2d8f1df5c9ee83e59eb2d709eb153b0570f12e726690f586154b01b0a88bb540"),
    24: ("f0f917b9c3e9c96d16ea287aff9b05ecf4de88bc61d478e4aefcb64932fba70c", "6ab02d922b5c937ecfe2a479be87a5d3e5ef950dc48da09d31f37b47d899ca9c"),
    25: ("e0154737e76392e8bf94fb2c0dfa5ddad4b53aeec942a0a8cdd8ba63443e6072", "c5ea59aca7789dd507ac31c4a82bbd4c172f9e3544f8e040442c20d1dfa9e16d"),
    26: ("d0ff11e09b0ee0c817334946e746a38ab621161d5f9c46af95c68b851f8d9a1a", "b056fae9f358111b6c9e2494bdba645f206be581959b8d3763e97d62a65dd961"),
    27: ("eed8e8bee1db8fe7af39b5b43ecf14282c5c33eca0959726eea06f662027eacc", "5be3823a57c82b632cead6eb09f438c6010a244dc0975f2a3e466f45d2c06840"),
    28: ("974df4b51e8905bdaabe61e80496cbf331f5c9aa9ddc2cb94113f58c2b7d2837", "c0b0e2a2b7aad46919d1afc980f7d5e39101fb07948ce65d9cac802d8b47682e"),
    29: ("d9ae868509c610a69acbf3d69cde4f36a8e344cbbc444f93c917bf7b9f3e784f", "1e8839a97178914171defd6a97158f06fcac1fc3f0d45f2acdff9c49ab3fced9"),
}
OMNIPOSE = {
    "Sample000033.png": ("7aa5de83c22773b1e663d7423dbbdbe015c113d3e4069c92d7affbf157d91032", "ab9ae36490fc51abb42163d5af533cbc974a217acf5d54a27b6d8ab8255d509d"),
    "Sample000193.png": ("81f9634976c3797a49cde95242e70352fe81d8f4949e1e0d9c25b885edd47ee1", "d8d12dceb568e5c7854818280427444b4037db1f5180f55a832b4b96e907bb55"),
    "Sample000252.png": ("a0421e1165dbaca51df67649f0a2739b992c14c689948cb5b07f43a547bc1473", "cac10ca742cea196359f28f8ac23a7de554dbcdad9c9cd737db33b857ab3391c"),
    "Sample000306.tiff": ("a0bc90058fbcdc3228ee8859aa8608c8b93e35c28a02ed0962fda7c598665995", "9f98032961dcbf5fdb8e9fed62bcd53246c0271b34a64c1d325ff3a4ef409597"),
    "caulo_15.tif": ("d79e7419acd529b0328a2e6eca447f41e980097c25b449a72116b8333ef021f2", "3ed4e4a68f347bfd259f29dfa3f07a434fe2a23c42b21d30277bf0a60e2cb676"),
    "e1t1_crop.tif": ("259c6cf8075b64b58726adafe740a9f01e75944266ad0a23091df1514edabcc5", "4fbd0332c20cd892fd57fcc0f95185ebe55ac0b662471bc745286e49d1e618ae"),
    "ec_5I_t141xy5c1.tif": ("d58ef52f2f3f9296a6b73f3b5582d1c4067d30ca58bc134889bd2855acb54205", "96b8f5244ebc4644811d9eaae9402195a19ef90b5ca1f8092c43cc6106c8db01"),
}
DL_BRIGHTFIELD = {
    "15_0_1": ("7f62f7118242cb0e9d427c5496da4351220c8667a5592d4d648b01f2c95cb593", "9b84a5f5142a7321d3d1807b902363d01ceec56909251fc99dc5e40eae1f7cd9"),
    "15_0_2": ("8ad0325a86078c771b0a95e7b363a59069800b824d19fdf0a3aeac71bf470f28", "81fa563dd6b37a06867405af0044b426e8cc513ed2bc44b3c6eed6cf3b82e84d"),
    "20_0_0": ("a12b2ce80f8ce1297bfebb417e88e199293d829adc24b5a4b2fb5ccbf23ccf02", "cb134d12310bfb578e033facf08c89e9da928ad89b20a753b4355ff1724cbdee"),
    "20_0_1": ("bdba207c65193faa99b065e6ee2921c0cf8d0e5c5b0e935434452ec43147a8e8", "185628646b9ffb492835f9e8c68aee177326ef58806c76acb242a77a7597a603"),
    "21_0_0": ("a9dff0a19c4559b0bdcc8e8ca239502fe9b4ebebf8dc5a592d8317cd1be2f937", "cb134d12310bfb578e033facf08c89e9da928ad89b20a753b4355ff1724cbdee"),
    "21_0_1": ("5b906ccbf8e44bd2bd6013bdeecf3e45ec8760db78bbaa06d7bd86554c863248", "185628646b9ffb492835f9e8c68aee177326ef58806c76acb242a77a7597a603"),
    "28_0_0": ("c15f0551fab5ad6a95a3e2292d3cdf90d0913f0b863ed6469e7f0380e7ba34d6", "5c181fd36282598ef08de2e28fde83fe8cc26f844f5bd8c2816e9f3483023389"),
    "28_0_1": ("55fee5af0921d7d4b583d4b216d6b57c0b712bd94d4b803600affbddee4accb7", "61b15f3ba9c2f6d19cf37356cac9b6d826c59a2f6677f8cc0baf80d6b858ba3c"),
    "28A_0_0": ("27549c65202e84d453924dce115f22635fdb7409eb34f8beddde040af01711d6", "731b3dea61a7a83be0dde20cebae806a2f9b44f86d3c11d7535c8fa2fb3ec3e9"),
    "28A_0_1": ("96627e52d5571791af4f423fb302eff469c7cd7fd8c73999b4970a44d6780440", "3564360053068f8ec9f44377eddd96e9b3ae92725282e3f3088417435405ef80"),
    "29_0_0": ("fb6a0e6f25cbe006d915832fc10b0d617d3ed20b62e6d82d4af998311ef86798", "7d55fa018aaa7eb614232067a216627f3d25c89c26be9f11a7efb016ca81ea02"),
    "29_0_1": ("0c52c5ffad2bc305538245a6d75a47861bef81214f0ec79c94d8432850f69e55", "7b94ec66254bc2eacc9bfbc7315f3c2ec61c42af10de0f6993e885946f334d41"),
    "33_0_3": ("b5a13928a610d3406b2b7fc497b3d9aab5e471fa680dadce48e890a691de1674", "5462cbf5b4beb61e8192983566767ef63a77c001a939bc373bd0bf6e301f7070"),
    "33_0_6": ("1708c7aef245ee35673ea198506091edab07d5b52ed1e508cb4ebfcdf4019c99", "1042304891e8eeef9e4f2ae6417648f3b78f86bdae64a58b475010779405a0af"),
    "34_0_0": ("4692c77cf8e45965c1b3bb72b878a4973f3c2173bf6a9b5947c3811166149689", "90430409210cddec1c456fb8534e4090006a72da5e44f862d96d8531fec45ba8"),
    "34_0_1": ("034fa468b0605b9ba231b9dd32c9012f2cbcf1ef3130c187d2c3835296b55e4a", "74190581e97620ffa9b04bce05efb0fbb429ff9cdb2af606e605490f89ee0570"),
    "35_0_1": ("c14bb9d91278ee7d33ab996f7299cacc16a30a87a18bd5f9a3804942edc4e0d1", "3523f154a53cd7738dddb818d935eb26481e0d3760aaf43bcf293d730893efef"),
    "35_0_3": ("eed83da7d8537cd57e0e2ee395fdf2d3ed840ed15630677188e96f11a89912d0", "66d2b43b0a0e888a118f8d02e5255accff84009bef321bb9ecb53e88d1e90e9f"),
    "37_0_0": ("010992b935248ecb380ff3f2cb0f08bc419af7a66f8f1af6ece4d02c9c7c573a", "3f642ee0dd590daf998eb2538ad3c0eea57a6405c6e5d66f2687a4784ef36c56"),
    "37_0_4": ("2af8d6422d4f6464b3d5b40bdbb7dc8e5d1eda136acb9946b5b8fb474c793e7a", "7c8ddf08b4a74cc4cb0daca2422748118c091a77c6eb4ff7e10712abe16cd3b7"),
    "41_0_0": ("3c8825e105d84a776af9013998715be097faa337a515e8d54b1535c3d705a09a", "963581c56f23f616b85652541a595876eab120b6e22a0d205609074a91ecb3c3"),
    "41_0_1": ("73472994550160bc8e51855e87896e036af42cf9ff8f5ab068065c6b63fba592", "8372fb2207e7a1b7391effee441c5e9df4c83ebd12dacab4aa78a175764ddd59"),
    "42_0_0": ("a15f710e6970f6566f4809053ad3e126fcfe9572f62c68534eed61426975bb43", "7e30517431e278c4db64131d9fbef82508e1ea31e96b3a999c75f697a01b42cc"),
    "42_0_1": ("5dc3530439e9da15f4afc01486dd5690ae8a56337639c6af1cda119c3ed773ed", "4ab1ec8144ac91afdcc9ebc6ee8dc780bbd7af6068ff00c2b22766adeeb8310b"),
    "44_0_0": ("e5dc194f792a8feacaff4b7b986f578f36ed44f590329568de5d017dd499a838", "88b29e18d5c0790ad2e6920902db959ee1ae61bd711d9367bf85a11534607e84"),
    "44_0_1": ("f5745c40a96fb32e45c5d1cc5a8bc559ad28f95a7f058e57e0befabbd440b70e", "3d0e15086a28a52acee416472f24eb8c24e27d2eb9d575f273ad5f1048e9aec7"),
    "50_0_0": ("fa2884bed5df8c795be53447cbf96789d94b408baa26e61c2e913164c16c91f7", "682dbf14f67bd40ae027bbba030d5739ec95ebfcadba40f4fc493c26cb203d5a"),
    "50_0_1": ("108f1815a4bb9f2ce0757cbf96448154a9723d9b01919b7583b2a8b339d0b800", "0d20707a46b52d86b7f06249b208032f00c63e85879b209cd84a1c02e6588858"),
}
DEEPLIIF_VAL = {'Bladder1': 'f5e65a68bec341bd5196f05931748c6d596257fe18669a6ff012682dfffa90c9', 'Lung1': '7a492ab787328b43bae61a384336a0044f224b88cdcd0e59c9ce8361cc813e8f'}
ADS_SUBJECT1 = ("d429c2f971cb1336c331055056f016a807032d9c3434e3bdc6090ec22b09ffd2", "7e7a2e94668f4ea33302e999afa50f6e5bbe0a60865a3847d7db4924cbe43c45")


_GBM = ("pengyzhang/cell_seg_matlab", "9bec602ff4a189dd45b4b75e8cf8ef4ae0b49b8d")
_ISBI = ("zhixuhao/unet", "b45af4d458437d8281cc218a07fd4380818ece4a")
_OMNI = ("kevinjohncutler/omnipose", "871f2c93a63a14f8ca84efaa8f4715c4e2749769")
_DLF = ("nadeemlab/DeepLIIF", "eab8bddd031d42cf6b12546d9081babb41f6b7e5")
_DLBF = ("anonymusUID/DL_BrightField", "d070e103312b20bea1db9eec189afc2188ec5934")
_ADS = ("axondeepseg/data-testing", "d9d44a88b8ef7508e2be83bbe2c91df6f6ff8166")


def _entry(name: str, modality: str, objects: str, source: tuple[str, str], image: RawFile, labels: RawFile,
           loader: str, reference: str, citation: str) -> Entry:
    return Entry(name=name, modality=modality, objects=objects, origin="github", source=source[0],
                 version=source[1], image=image, labels=labels, loader=loader, frame=None, crop=None,
                 reference=reference, derived="", licence="see SOURCES.md", redistributable=False,
                 citation=citation, split="train")


def _entries() -> tuple[Entry, ...]:
    out = []
    for i, (img, xml) in GBM.items():
        out.append(_entry(f"gbm40_he_{i:02d}", "he", "nuclei", _GBM,
                          RawFile(f"data/GBM40/raw_image/{i:02d}.tif", img),
                          RawFile(f"data/GBM40/contour_annotation_xml/{i:02d}_data.xml", xml),
                          "tiff_rgb+contour_xml", "manual", "Kong et al., ISBI 2016"))
    for s, (img, lab) in ISBI.items():
        out.append(_entry(f"isbi2012_tem_train_s{s:02d}", "tem", "neurites", _ISBI,
                          RawFile(f"data/membrane/train/image/{s}.png", img),
                          RawFile(f"data/membrane/train/label/{s}.png", lab),
                          "png_gray+membrane_cc", "manual", "Arganda-Carreras et al. 2015"))
    for f, (img, lab) in OMNIPOSE.items():
        stem = f.rsplit(".", 1)[0]
        out.append(_entry(f"omnipose_phase_{stem.lower()}", "phase", "bacteria", _OMNI,
                          RawFile(f"docs/test_files/{f}", img),
                          RawFile(f"docs/test_files/masks/{stem}_cp_masks.tif", lab),
                          "gray+tiff_labels", "published", "Cutler et al., Nat. Methods 19 (2022)"))
    for tile, sha in DEEPLIIF_VAL.items():  # one file: six 512-px panels, IHC | H | DAPI | Lap2 | Ki67 | masks
        raw = RawFile(f"Datasets/Sample_Dataset/val/{tile}.png", sha)
        cite = "Ghahremani et al., Nat. Mach. Intell. 4 (2022)"
        out.append(_entry(f"deepliif_val_ihc_{tile.lower()}", "ihc", "nuclei", _DLF, raw, raw, "deepliif_panel_0",
                          "manual", cite))
        out.append(_entry(f"deepliif_val_dapi_{tile.lower()}", "fluorescence", "nuclei", _DLF, raw, raw,
                          "deepliif_panel_2", "manual", cite))
    for stem, (img, msk) in DL_BRIGHTFIELD.items():
        out.append(_entry(f"dlbf_brightfield_{stem.lower()}", "brightfield", "cells", _DLBF,
                          RawFile(f"ITMO/01_BRIGHT_FIELD/original_img/{stem}.png", img),
                          RawFile(f"ITMO/01_BRIGHT_FIELD/original_msk/{stem}.png", msk),
                          "png_rgb+binary_cc", "manual", "DL_BrightField (GitHub anonymusUID/DL_BrightField)"))
    p = "__test_files__/__test_aggregate__/all_subjects/subject 1/"
    out.append(_entry("axondeepseg_subject1", "sem", "axons", _ADS, RawFile(p + "image.png", ADS_SUBJECT1[0]),
                      RawFile(p + "image_seg-axon.png", ADS_SUBJECT1[1]), "png_gray+axon_class_cc", "published",
                      "Zaimi et al., Sci. Rep. 8 (2018)"))
    return tuple(out)


_POINT = re.compile(rb'<Point X="([-0-9.eE]+)" Y="([-0-9.eE]+)"')
_SHAPE = re.compile(rb"<Shape [^>]*>(.*?)</Shape>", re.S)


def contour_labels(xml: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Label image from an annotation file of closed contours (one ``<Shape>`` of ``<Point X= Y=>`` per
    object); later contours draw over earlier ones where they overlap."""
    from skimage.draw import polygon

    if len(xml) > MAX_XML_BYTES:
        raise CatalogError(f"annotation file of {len(xml)} bytes is over the {MAX_XML_BYTES} limit")
    labels = np.zeros(shape, np.int32)
    shapes = _SHAPE.findall(xml)
    if len(shapes) > MAX_POLYGONS:
        raise CatalogError(f"{len(shapes)} contours is over the {MAX_POLYGONS} limit")
    n = 0
    for body in shapes:
        pts = np.array([(float(y), float(x)) for x, y in _POINT.findall(body)], float)
        if len(pts) < 3 or not np.isfinite(pts).all():
            continue
        rr, cc = polygon(pts[:, 0], pts[:, 1], shape)
        if len(rr):
            n += 1
            labels[rr, cc] = n
    return labels


def _load_contour_xml(entry: Entry, img: Path, lab: Path):
    image = _catalog._read_tiff(img, None)
    return image, contour_labels(lab.read_bytes(), image.shape[:2])


def _load_gray_tiff_labels(entry: Entry, img: Path, lab: Path):
    image = _catalog._read_tiff(img, None) if img.suffix.lower() in (".tif", ".tiff") else _catalog._read_png(img)
    if image.ndim == 3:  # RGB(A) renderings of a grey phase image
        image = image[..., :3].mean(axis=-1).astype(np.float32)
    return image, _catalog._read_tiff(lab, None).astype(np.int32)


def _load_rgb_binary_cc(entry: Entry, img: Path, lab: Path):
    """A colour image with a binary (0 / 255, possibly stored as RGB) mask: one label per connected component."""
    from skimage.measure import label

    image = _catalog._read_png(img)[..., :3]
    mask = _catalog._read_png(lab)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return np.ascontiguousarray(image), label(mask > 127).astype(np.int32)


def _deepliif_panel(index: int):
    """A DeepLIIF training/validation file: panel ``index`` (0 IHC, 2 DAPI fluorescence) with the last
    panel's colour-coded nuclei as labels."""
    def load(entry: Entry, img: Path, lab: Path):
        panels = _catalog._read_png(img)
        side = panels.shape[0]
        if panels.ndim != 3 or panels.shape[1] != 6 * side:
            raise CatalogError(f"{img}: expected six {side}-px panels side by side, got {panels.shape}")
        image = panels[:, index * side : (index + 1) * side]
        if index == 2:  # DAPI is grey stored as RGB
            image = image.max(axis=-1)
        return np.ascontiguousarray(image), _catalog.colour_seg_labels(panels[:, 5 * side :])
    return load


LOADERS = dict(_catalog.LOADERS) | {"tiff_rgb+contour_xml": _load_contour_xml,
                                     "gray+tiff_labels": _load_gray_tiff_labels,
                                     "png_rgb+binary_cc": _load_rgb_binary_cc,
                                     "deepliif_panel_0": _deepliif_panel(0), "deepliif_panel_2": _deepliif_panel(2)}
TRAINING = _entries()
BY_NAME = {e.name: e for e in TRAINING}


def _check_disjoint() -> None:
    used = {(e.source, e.image.path) for e in CATALOG} | {(e.source, e.labels.path) for e in CATALOG}
    mine = {(e.source, e.image.path) for e in TRAINING} | {(e.source, e.labels.path) for e in TRAINING}
    if used & mine:
        raise CatalogError(f"training files that the benchmark scores: {sorted(used & mine)}")


_check_disjoint()


def load(entry: Entry | str, cache_dir, mirrors=None) -> tuple[np.ndarray, np.ndarray]:
    """(image, int32 labels) of one training entry, fetched into / read from ``cache_dir``."""
    entry = BY_NAME[entry] if isinstance(entry, str) else entry
    img_path, lab_path = _catalog.fetch(entry, cache_dir, mirrors)
    image, labels = LOADERS[entry.loader](entry, img_path, lab_path)
    _catalog._check_side(image.shape, entry.name)
    if labels.shape != image.shape[:2]:
        raise CatalogError(f"{entry.name}: labels {labels.shape} do not match image {image.shape}")
    return np.ascontiguousarray(image), np.ascontiguousarray(labels, dtype=np.int32)
