#include "expertChoiceRouterPlugin.h"

#include "../common/pluginUtils.h"
#include "expertChoiceRouterKernel.h"

#include <cmath>
#include <exception>
#include <utility>

using namespace nvinfer1;

namespace nucleus
{
namespace plugin
{
namespace
{
constexpr char const* kROUTER_NAME = "ExpertChoiceRouter";
constexpr char const* kATTR_NUMERATOR = "capacity_numerator";
constexpr char const* kATTR_DENOMINATOR = "capacity_denominator";
constexpr char const* kATTR_SCORE_FUNCTION = "score_function";
constexpr char const* kATTR_ROUTE_SCALE = "route_scale";
constexpr char const* kKNOWN_ATTRIBUTES[]
    = {kATTR_NUMERATOR, kATTR_DENOMINATOR, kATTR_SCORE_FUNCTION, kATTR_ROUTE_SCALE, nullptr};
constexpr int32_t kNB_INPUTS = 1;
constexpr int32_t kNB_OUTPUTS = 2;

void validate(ExpertChoiceRouterParams const& p)
{
    std::string const prefix = std::string(kROUTER_NAME) + ": ";
    check(p.capacityNumerator > 0,
        prefix + "capacity_numerator must be a positive integer, got " + std::to_string(p.capacityNumerator));
    check(p.capacityDenominator > 0,
        prefix + "capacity_denominator must be a positive integer, got " + std::to_string(p.capacityDenominator));
    check(p.scoreFunction == "softmax" || p.scoreFunction == "sigmoid",
        prefix + "score_function must be \"softmax\" or \"sigmoid\", got \"" + p.scoreFunction + "\"");
    check(std::isfinite(p.routeScale) && p.routeScale > 0.0F,
        prefix + "route_scale must be a finite positive float, got " + std::to_string(p.routeScale));
}

//! C for concrete shapes (the same integer rule as getOutputShapes).
int64_t capacityOf(ExpertChoiceRouterParams const& p, int64_t S, int64_t E)
{
    return nucleusExpertChoiceRouterCapacity(p.capacityNumerator, p.capacityDenominator, S, E);
}

bool checkIo(int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError(std::string(kROUTER_NAME) + ": expected 1 input (router_logits) and 2 outputs (token_indices, gating)");
        return false;
    }
    return true;
}
} // namespace

ExpertChoiceRouterPlugin::ExpertChoiceRouterPlugin(ExpertChoiceRouterParams params)
    : mParams(std::move(params))
{
    validate(mParams);
}

// IPluginV3 ----------------------------------------------------------------------------------------------------

IPluginCapability* ExpertChoiceRouterPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* ExpertChoiceRouterPlugin::clone() noexcept
{
    try
    {
        return new ExpertChoiceRouterPlugin(mParams);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

// IPluginV3OneCore -----------------------------------------------------------------------------------------------

char const* ExpertChoiceRouterPlugin::getPluginName() const noexcept
{
    return kROUTER_NAME;
}

char const* ExpertChoiceRouterPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* ExpertChoiceRouterPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

// IPluginV3OneBuild ----------------------------------------------------------------------------------------------

int32_t ExpertChoiceRouterPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t ExpertChoiceRouterPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    if (!isFloatType(inputTypes[0]))
    {
        logError(std::string(kROUTER_NAME) + ": router_logits must be float32, float16 or bfloat16");
        return -1;
    }
    outputTypes[0] = DataType::kINT64;
    outputTypes[1] = DataType::kFLOAT;
    return 0;
}

int32_t ExpertChoiceRouterPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    if (inputs[0].nbDims != 3)
    {
        logError(std::string(kROUTER_NAME) + ": router_logits must be rank 3 [B, S, E]");
        return -1;
    }
    IDimensionExpr const* batch = inputs[0].d[0];
    IDimensionExpr const* tokens = inputs[0].d[1];
    IDimensionExpr const* experts = inputs[0].d[2];
    // C = max(1, ceil(num * S / (den * E)))
    IDimensionExpr const* scaledTokens
        = exprBuilder.operation(DimensionOperation::kPROD, *exprBuilder.constant(mParams.capacityNumerator), *tokens);
    IDimensionExpr const* scaledExperts = exprBuilder.operation(
        DimensionOperation::kPROD, *exprBuilder.constant(mParams.capacityDenominator), *experts);
    IDimensionExpr const* ceilDiv = exprBuilder.operation(DimensionOperation::kCEIL_DIV, *scaledTokens, *scaledExperts);
    IDimensionExpr const* capacity = exprBuilder.operation(DimensionOperation::kMAX, *ceilDiv, *exprBuilder.constant(1));
    for (int32_t i = 0; i < kNB_OUTPUTS; ++i)
    {
        outputs[i].nbDims = 3;
        outputs[i].d[0] = batch;
        outputs[i].d[1] = experts;
        outputs[i].d[2] = capacity;
    }
    return 0;
}

bool ExpertChoiceRouterPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= kNB_INPUTS + kNB_OUTPUTS)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloatType(desc.type);
    case 1: return desc.type == DataType::kINT64;
    default: return desc.type == DataType::kFLOAT;
    }
}

int32_t ExpertChoiceRouterPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
    int32_t nbOutputs) noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    Dims const& maxDims = in[0].max;
    if (maxDims.nbDims != 3)
    {
        logError(std::string(kROUTER_NAME) + ": router_logits must be rank 3 [B, S, E]");
        return -1;
    }
    int64_t const experts = maxDims.d[2];
    int64_t const capacity = capacityOf(mParams, maxDims.d[1], experts);
    if (experts > NUCLEUS_ROUTER_MAX_EXPERTS || capacity > NUCLEUS_ROUTER_MAX_CAPACITY || capacity > maxDims.d[1])
    {
        logError(std::string(kROUTER_NAME) + ": unsupported shape (E = " + std::to_string(experts) + ", C = "
            + std::to_string(capacity) + "); the kernel takes E <= 256 and C <= min(S, 4096)");
        return -1;
    }
    return 0;
}

size_t ExpertChoiceRouterPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNB_INPUTS || inputs[0].max.nbDims != 3)
    {
        return 0;
    }
    Dims const& m = inputs[0].max; // the workspace grows with every dimension: the max shape bounds them all
    int64_t const capacity = capacityOf(mParams, m.d[1], m.d[2]);
    return nucleusExpertChoiceRouterWorkspaceSize(static_cast<int>(m.d[0]), static_cast<int>(m.d[1]),
        static_cast<int>(m.d[2]), static_cast<int>(capacity));
}

// IPluginV3OneRuntime --------------------------------------------------------------------------------------------

int32_t ExpertChoiceRouterPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    Dims const& d = in[0].dims;
    if (d.nbDims != 3 || out[0].dims.nbDims != 3 || out[0].dims.d[2] != capacityOf(mParams, d.d[1], d.d[2]))
    {
        logError(std::string(kROUTER_NAME) + ": output shape does not match the capacity rule");
        return -1;
    }
    return 0;
}

int32_t ExpertChoiceRouterPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        Dims const& d = inputDesc[0].dims;
        int const batch = static_cast<int>(d.d[0]);
        int const tokens = static_cast<int>(d.d[1]);
        int const experts = static_cast<int>(d.d[2]);
        int const capacity = static_cast<int>(outputDesc[0].dims.d[2]);
        if (static_cast<int64_t>(batch) * tokens == 0)
        {
            return 0; // empty batch: nothing to write
        }
        int const status = nucleusExpertChoiceRouterLaunch(inputs[0], toNucleusDType(inputDesc[0].type), batch,
            tokens, experts, capacity, mParams.scoreFunction == "sigmoid" ? 1 : 0, mParams.routeScale,
            static_cast<int64_t*>(outputs[0]), static_cast<float*>(outputs[1]), workspace,
            nucleusExpertChoiceRouterWorkspaceSize(batch, tokens, experts, capacity), stream);
        if (status != NUCLEUS_STATUS_SUCCESS)
        {
            logError(std::string(kROUTER_NAME) + ": kernel launch failed: " + nucleusKernelStatusString(status));
            return status;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string(kROUTER_NAME) + ": " + e.what());
    }
    return -1;
}

IPluginV3* ExpertChoiceRouterPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* ExpertChoiceRouterPlugin::getFieldsToSerialize() noexcept
{
    mSerialFields.clear();
    mSerialFields.emplace_back(kATTR_NUMERATOR, &mParams.capacityNumerator, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back(kATTR_DENOMINATOR, &mParams.capacityDenominator, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back(kATTR_SCORE_FUNCTION, mParams.scoreFunction.c_str(), PluginFieldType::kCHAR,
        static_cast<int32_t>(mParams.scoreFunction.size() + 1));
    mSerialFields.emplace_back(kATTR_ROUTE_SCALE, &mParams.routeScale, PluginFieldType::kFLOAT32, 1);
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

// Creator --------------------------------------------------------------------------------------------------------

ExpertChoiceRouterPluginCreator::ExpertChoiceRouterPluginCreator()
{
    mFieldNames.emplace_back(kATTR_NUMERATOR, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kATTR_DENOMINATOR, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kATTR_SCORE_FUNCTION, nullptr, PluginFieldType::kCHAR, 0);
    mFieldNames.emplace_back(kATTR_ROUTE_SCALE, nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* ExpertChoiceRouterPluginCreator::getPluginName() const noexcept
{
    return kROUTER_NAME;
}

char const* ExpertChoiceRouterPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* ExpertChoiceRouterPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* ExpertChoiceRouterPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* ExpertChoiceRouterPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        FieldReader fields(kROUTER_NAME, fc);
        fields.warnUnknown(kKNOWN_ATTRIBUTES);
        ExpertChoiceRouterParams params;
        params.capacityNumerator = fields.getInt32(kATTR_NUMERATOR);
        params.capacityDenominator = fields.getInt32(kATTR_DENOMINATOR);
        params.scoreFunction = fields.getString(kATTR_SCORE_FUNCTION);
        params.routeScale = fields.getFloat32(kATTR_ROUTE_SCALE);
        return new ExpertChoiceRouterPlugin(std::move(params));
    }
    catch (std::exception const& e)
    {
        logError(std::string("cannot create ") + kROUTER_NAME + " '" + (name != nullptr ? name : "") + "': " + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace nucleus
